"""The same weights saved natively, as Hugging Face and as GGUF load to the same logits."""

from __future__ import annotations

import pytest
import torch

from mistral7b.loading import open_checkpoint, save_gguf, save_hf, save_native
from tests.conftest import rel_err, tiny_args

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """One random windowed model written by transformers, re-saved in every format by our writers."""
    from tests.conftest import hf_model

    root = tmp_path_factory.mktemp("formats")
    args = tiny_args(window=6, n_heads=4, n_kv_heads=2, vocab=96)
    hf = hf_model(args, seed=21)
    hf.save_pretrained(root / "hf")
    state = dict(open_checkpoint(str(root / "hf")).tensors())
    save_native(root / "native", args, state)
    save_hf(root / "hf_sharded", args, state, max_shard_bytes=20_000)
    for q in ("F32", "F16", "Q8_0"):
        save_gguf(root / f"model-{q}.gguf", args, state, qtype=q)
    tokens = torch.randint(0, args.vocab_size, (1, 3 * 6 + 4), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(tokens).logits
    return root, args, tokens, ref


def logits(path: str, tokens: torch.Tensor, window: int | None | str = "keep") -> torch.Tensor:
    from mistral7b.model.build import build_model

    model = build_model(open_checkpoint(path, sliding_window=window), torch.float32, progress=False)
    with torch.no_grad():
        return model(tokens, torch.arange(tokens.shape[1])[None])


@pytest.mark.parametrize("name,tol", [("hf", 1e-4), ("native", 1e-4), ("hf_sharded", 1e-4), ("model-F32.gguf", 1e-4),
                                      ("model-F16.gguf", 2e-2), ("model-Q8_0.gguf", 5e-2)])
def test_every_format_gives_the_oracle_logits(saved, name, tol):
    root, args, tokens, ref = saved
    window = 6 if name.endswith(".gguf") and open_checkpoint(str(root / name)).args.sliding_window is None else "keep"
    assert rel_err(logits(str(root / name), tokens, window), ref) < tol


def test_transformers_reads_our_gguf_as_we_do(saved):
    """transformers' own GGUF loader (it un-permutes q/k itself) on our F32 file gives our logits."""
    root, args, tokens, _ = saved
    llama_tokens = tokens  # GGUF has no window key for llama: compare without one on both sides
    hf = transformers.AutoModelForCausalLM.from_pretrained(root, gguf_file="model-F32.gguf", dtype=torch.float32)
    with torch.no_grad():
        ref = hf.eval()(llama_tokens).logits
    ours = logits(str(root / "model-F32.gguf"), llama_tokens, window=None)
    assert rel_err(ours, ref) < 1e-4
