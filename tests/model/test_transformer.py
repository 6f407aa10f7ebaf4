"""Our Transformer against transformers' MistralForCausalLM / LlamaForCausalLM on the same weights."""

from __future__ import annotations

import pytest
import torch

from mistral7b.model.attention import window_mask
from tests.conftest import engine_generate, load_ours, rel_err, tiny_args


@pytest.mark.parametrize(
    "window,n_heads,n_kv_heads,tied",
    [
        (4, 4, 4, False),   # GQA ratio 1 (plain multi-head)
        (7, 4, 2, False),   # ratio 2, odd window
        (8, 4, 1, True),    # ratio 4, tied embeddings
        (16, 8, 2, False),  # ratio 4
        (None, 4, 2, True), # a Llama: no window
    ],
)
def test_logits_match_hf(hf_checkpoint, window, n_heads, n_kv_heads, tied):
    args = tiny_args(window=window, n_heads=n_heads, n_kv_heads=n_kv_heads, tied=tied)
    hf, folder = hf_checkpoint(args)
    ours = load_ours(folder)
    T = 3 * (window or 12) + 5
    tokens = torch.randint(0, args.vocab_size, (2, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(tokens).logits
        got = ours(tokens, torch.arange(T).expand(2, T))
    assert rel_err(got, ref) < 1e-4
    if tied:
        assert ours.output.weight is ours.tok_embeddings.weight


@pytest.mark.parametrize("window", [5, None])
def test_greedy_continuation_matches_hf_generate(hf_checkpoint, window):
    from mistral7b.engine.sampling_params import SamplingParams

    args = tiny_args(window=window)
    hf, folder = hf_checkpoint(args)
    ours = load_ours(folder)
    prompt = torch.randint(0, args.vocab_size, (1, 13), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=24, do_sample=False,
                          pad_token_id=0, eos_token_id=None)[0, 13:].tolist()
    out, _ = engine_generate(ours, [prompt[0].tolist()], [SamplingParams(max_tokens=24, temperature=0)],
                             chunk_size=4, block_size=4)
    assert out[0][0][0] == ref


def test_window_mask_rule():
    """W keys, the query itself included: position i sees i-W+1 .. i."""
    pos = torch.arange(10)[None]
    mask = window_mask(pos, pos, 3)[0, 0]
    for i in range(10):
        assert mask[i].nonzero().flatten().tolist() == list(range(max(0, i - 2), i + 1))
    full = window_mask(pos, pos, None)[0, 0]
    assert full.sum().item() == 55


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_close_to_float32(hf_checkpoint, dtype):
    args = tiny_args(window=6)
    _, folder = hf_checkpoint(args)
    ref_model, half = load_ours(folder), load_ours(folder, dtype)
    assert half.tok_embeddings.weight.dtype == dtype
    tokens = torch.randint(0, args.vocab_size, (1, 20), generator=torch.Generator().manual_seed(3))
    pos = torch.arange(20)[None]
    with torch.no_grad():
        ref, got = ref_model(tokens, pos), half(tokens, pos)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    assert rel_err(got, ref) < 5e-2


def test_packed_segments_equal_separate_passes(hf_checkpoint):
    """Two examples packed in one row with segment ids give each example's own logits."""
    args = tiny_args(window=5)
    _, folder = hf_checkpoint(args)
    ours = load_ours(folder)
    g = torch.Generator().manual_seed(4)
    a = torch.randint(0, args.vocab_size, (1, 9), generator=g)
    b = torch.randint(0, args.vocab_size, (1, 7), generator=g)
    packed = torch.cat([a, b], 1)
    positions = torch.cat([torch.arange(9), torch.arange(7)])[None]
    segments = torch.tensor([[0] * 9 + [1] * 7])
    with torch.no_grad():
        got = ours(packed, positions, segment_ids=segments)
        want = torch.cat([ours(a, torch.arange(9)[None]), ours(b, torch.arange(7)[None])], 1)
    assert rel_err(got, want) < 1e-5
