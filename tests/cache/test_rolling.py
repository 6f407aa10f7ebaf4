"""The rolling buffer and chunked pre-fill give exactly the logits of one full pass, for any chunk size."""

from __future__ import annotations

import pytest
import torch

from mistral7b.cache import RollingKVCache
from tests.conftest import engine_generate, hf_model, load_ours, rel_err, tiny_args

W = 6


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    args = tiny_args(window=W, n_heads=4, n_kv_heads=2)
    hf = hf_model(args, seed=5)
    folder = tmp_path_factory.mktemp("rolling")
    hf.save_pretrained(folder)
    return args, hf, load_ours(str(folder))


def run_chunked(model, args, tokens, chunk):
    cache = RollingKVCache(args, tokens.shape[0], torch.float32)
    T = tokens.shape[1]
    pos = torch.arange(T).expand(tokens.shape[0], T)
    with torch.no_grad():
        out = [model(tokens[:, s : s + chunk], pos[:, s : s + chunk], cache) for s in range(0, T, chunk)]
    return torch.cat(out, 1), cache


@pytest.mark.parametrize("chunk", [1, W - 1, W, W + 1, 3 * W + 2])
def test_chunked_prefill_equals_full_pass(pair, chunk):
    args, hf, ours = pair
    T = 4 * W + 3  # crosses several multiples of W
    tokens = torch.randint(0, args.vocab_size, (2, T), generator=torch.Generator().manual_seed(chunk))
    with torch.no_grad():
        ref = hf(tokens).logits
    got, cache = run_chunked(ours, args, tokens, chunk)
    assert rel_err(got, ref) < 1e-4
    assert cache.capacity == W  # the buffer never grows past the window


def test_ring_slots_hold_position_mod_w(pair):
    args, _, ours = pair
    T = 2 * W + 4
    tokens = torch.randint(0, args.vocab_size, (1, T), generator=torch.Generator().manual_seed(9))
    _, cache = run_chunked(ours, args, tokens, 5)
    for slot, p in enumerate(cache.slot_pos[0].tolist()):
        assert p % W == slot and T - W <= p < T


def test_incremental_decode_equals_recompute(pair):
    """Decode one token at a time through the ring; each step equals recomputing the whole sequence."""
    args, _, ours = pair
    T = 3 * W + 4
    tokens = torch.randint(0, args.vocab_size, (1, T), generator=torch.Generator().manual_seed(11))
    cache = RollingKVCache(args, 1, torch.float32)
    with torch.no_grad():
        ours(tokens[:, :W], torch.arange(W)[None], cache)
        for t in range(W, T):
            step = ours(tokens[:, t : t + 1], torch.tensor([[t]]), cache)[0, -1]
            full = ours(tokens[:, : t + 1], torch.arange(t + 1)[None])[0, -1]
            assert rel_err(step, full) < 1e-5, t


def test_no_window_cache_grows(tmp_path):
    args = tiny_args(window=None)
    hf = hf_model(args, seed=3)
    hf.save_pretrained(tmp_path)
    ours = load_ours(str(tmp_path))
    tokens = torch.randint(0, args.vocab_size, (1, 40), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = hf(tokens).logits
    got, cache = run_chunked(ours, args, tokens, 7)
    assert rel_err(got, ref) < 1e-4
    assert cache.capacity == 40


def test_mixed_length_batch_equals_each_alone(pair):
    """Prompts of different lengths generated together give each one's lone result (ids and logprobs)."""
    from mistral7b.engine.sampling_params import SamplingParams

    args, _, ours = pair
    g = torch.Generator().manual_seed(12)
    prompts = [torch.randint(0, args.vocab_size, (n,), generator=g).tolist() for n in (3, 2 * W + 1, W, 17)]
    params = [SamplingParams(max_tokens=n, temperature=0, logprobs=True) for n in (9, 4, 12, 7)]

    def collect(ps, sps):
        out, _ = engine_generate(ours, ps, sps, chunk_size=4, block_size=4)
        return {i: completions[0] for i, completions in out.items()}

    together = collect(prompts, params)
    for i, (p, sp) in enumerate(zip(prompts, params)):
        alone = collect([p], [sp])[0]
        assert together[i][0] == alone[0]
        assert torch.allclose(torch.tensor(together[i][1]), torch.tensor(alone[1]), atol=1e-5)
        assert len(alone[0]) == sp.max_tokens
