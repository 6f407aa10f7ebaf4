"""The Triton paged-attention kernel against its PyTorch reference, run by Triton's interpreter on a CPU.

Cases: decode rows and pre-fill chunks in one launch layout, GQA groups of 1, 3 and 4 (padded to a power of
two), windows below / at / above the context, tiles that straddle multiples of W and of the block size,
shuffled block tables with released (null) blocks, and split-key (flash-decoding) launches.
"""

from __future__ import annotations

import pytest
import torch

from mistral7b import kernels
from mistral7b.kernels import paged_attention as pa

pytestmark = pytest.mark.skipif(not kernels.available(), reason="triton is not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # a GPU runs the compiled kernels, a CPU the interpreter


def dev(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.to(DEVICE) for t in tensors]


def _case(lens_new: list[int], lens_total: list[int], H: int, H_kv: int, window: int | None, block_size: int,
          seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    D = 16
    per_seq = [-(-t // block_size) for t in lens_total]
    num_blocks = sum(per_seq) + 1
    k_cache = torch.randn(H_kv, num_blocks, block_size, D, generator=g)
    v_cache = torch.randn(H_kv, num_blocks, block_size, D, generator=g)
    perm = (torch.randperm(num_blocks - 1, generator=g) + 1).tolist()
    width = max(per_seq)
    tables = torch.zeros(len(lens_total), width, dtype=torch.int32)
    for s, n in enumerate(per_seq):
        ids = [perm.pop() for _ in range(n)]
        if window is not None:  # blocks no query of this step can see were released: null in the table
            first_needed = max(0, lens_total[s] - lens_new[s] - window + 1) // block_size
            ids = [0] * first_needed + ids[first_needed:]
        tables[s, :n] = torch.tensor(ids, dtype=torch.int32)
    N = sum(lens_new)
    q = torch.randn(N, H, D, generator=g)
    query_start = torch.tensor([0] + list(torch.tensor(lens_new).cumsum(0)), dtype=torch.int32)
    seq_lens = torch.tensor(lens_total, dtype=torch.int32)
    return q, k_cache, v_cache, tables, seq_lens, query_start


@pytest.mark.parametrize("H,H_kv", [(4, 4), (6, 2), (8, 2)])
@pytest.mark.parametrize("window", [None, 7, 16, 40])
def test_kernel_equals_reference(H: int, H_kv: int, window: int | None) -> None:
    lens_new = [1, 1, 5, 23, 1]
    lens_total = [1, 37, 5, 50, 17]
    q, k, v, tables, seq_lens, query_start = _case(lens_new, lens_total, H, H_kv, window, block_size=4)
    want = pa.reference_paged_attention(q, k, v, tables, seq_lens, query_start, window)
    for block_q in (1, 4):
        seqs, firsts = pa.query_tiles(lens_new, block_q)
        got = pa.paged_attention(*dev(q, k, v, tables, seq_lens, query_start, torch.tensor(seqs, dtype=torch.int32),
                                      torch.tensor(firsts, dtype=torch.int32)), window, block_q).cpu()
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("splits", [2, 3, 8])
@pytest.mark.parametrize("window", [None, 24])
def test_split_keys_equal_one_pass(splits: int, window: int | None) -> None:
    lens_total = [3, 70, 33, 129]
    q, k, v, tables, seq_lens, query_start = _case([1] * 4, lens_total, 8, 2, window, block_size=16, seed=1)
    want = pa.reference_paged_attention(q, k, v, tables, seq_lens, query_start, window)
    seqs, firsts = pa.query_tiles([1] * 4, 1)
    got = pa.paged_attention(*dev(q, k, v, tables, seq_lens, query_start, torch.tensor(seqs, dtype=torch.int32),
                                  torch.tensor(firsts, dtype=torch.int32)), window, 1, num_splits=splits).cpu()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("splits", [1, 3, 16])
@pytest.mark.parametrize("total", [1, 31, 32, 33, 64, 97, 130])
@pytest.mark.parametrize("window", [None, 40])
def test_one_token_step_equals_reference(splits: int, total: int, window: int | None) -> None:
    """A step of one token (batch-1 decode) over 1 to 16 key splits: contexts that end at the start, inside and
    at the end of a key block (32 keys), splits left without keys, windows that cut the context."""
    q, k, v, tables, seq_lens, query_start = _case([1], [total], 8, 2, window, block_size=16, seed=total)
    want = pa.reference_paged_attention(q, k, v, tables, seq_lens, query_start, window)
    tiles = dev(torch.zeros(1, dtype=torch.int32), torch.zeros(1, dtype=torch.int32))
    got = pa.paged_attention(*dev(q, k, v, tables, seq_lens, query_start), *tiles, window, 1,
                             num_splits=splits).cpu()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("splits", [2, 5])
def test_mixed_step_split_decodes_then_prefill(splits: int) -> None:
    """A mixed step as the cache launches it: its decodes (first) with key splits over `split_tokens` rows, then
    its pre-fill tiles. The decode launch writes no row past its own (its partials and merge skip the pre-fill
    tokens), and the two launches together equal the reference."""
    lens_new = [1, 1, 1, 9, 20]
    lens_total = [40, 3, 77, 9, 52]
    q, k, v, tables, seq_lens, query_start = _case(lens_new, lens_total, 8, 2, 24, block_size=8, seed=5)
    want = pa.reference_paged_attention(q, k, v, tables, seq_lens, query_start, 24)
    out = torch.full_like(q, 7.0).to(DEVICE)
    args = dev(q, k, v, tables, seq_lens, query_start)
    zeros = torch.zeros(3, dtype=torch.int32)
    pa.paged_attention(*args, *dev(torch.arange(3, dtype=torch.int32), zeros), 24, 4, num_splits=splits, out=out,
                       split_tokens=3)
    assert bool((out[3:] == 7.0).all()), "the decode launch wrote pre-fill rows"
    seqs, firsts = pa.query_tiles([0, 0, 0, 9, 20], 4)
    pa.paged_attention(*args, *dev(torch.tensor(seqs, dtype=torch.int32), torch.tensor(firsts, dtype=torch.int32)),
                       24, 4, out=out)
    torch.testing.assert_close(out.cpu(), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("heads_per_program", [4, 16])
def test_rotary_store_equals_pytorch(heads_per_program: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """10 heads (6 q, 2 k, 2 v): a program each for q, k and v, or blocks of 4 heads (the last q and the k and v
    blocks half empty)."""
    from mistral7b.kernels import rotary_store as module
    from mistral7b.kernels.rotary_store import rotary_store
    from mistral7b.model.rope import apply_rotary, inv_frequencies, rotary_freqs

    g = torch.Generator().manual_seed(3)
    H, H_kv, D, N, bs, num_blocks = 6, 2, 16, 7, 4, 5
    qkv = torch.randn(N, (H + 2 * H_kv) * D, generator=g)
    positions = torch.tensor([0, 5, 9, 4095, 4096, 70000, -1])
    slots = torch.tensor([4, 5, 6, 7, 12, 13, 19])
    k_cache = torch.zeros(H_kv, num_blocks, bs, D)
    v_cache = torch.zeros(H_kv, num_blocks, bs, D)
    inv_freq = inv_frequencies(D, 1e6, "cpu")
    monkeypatch.setattr(module, "HEADS", heads_per_program)
    k_dev, v_dev = dev(k_cache, v_cache)
    q = rotary_store(*dev(qkv, positions, inv_freq, slots), k_dev, v_dev, H).cpu()
    k_cache, v_cache = k_dev.cpu(), v_dev.cpu()

    heads = qkv.view(1, N, H + 2 * H_kv, D)
    rotated = apply_rotary(heads[:, :, : H + H_kv], rotary_freqs(positions[None], inv_freq))[0]
    torch.testing.assert_close(q, rotated[:, :H], rtol=1e-5, atol=1e-5)
    flat_k = k_cache.view(H_kv, -1, D)
    flat_v = v_cache.view(H_kv, -1, D)
    torch.testing.assert_close(flat_k[:, slots].transpose(0, 1), rotated[:, H:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(flat_v[:, slots].transpose(0, 1), heads[0, :, H + H_kv :])
    untouched = torch.ones(H_kv * num_blocks * bs, dtype=torch.bool).view(H_kv, -1)
    untouched[:, slots] = False
    assert flat_k[untouched].abs().sum() == 0 and flat_v[untouched].abs().sum() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_rms_norm_and_silu_mul_equal_pytorch(dtype) -> None:
    from mistral7b.kernels.norms import add_rms_norm, silu_mul

    g = torch.Generator().manual_seed(4)
    x = torch.randn(5, 96, generator=g).to(dtype)
    delta = torch.randn(5, 96, generator=g).to(dtype)
    w = (1 + 0.1 * torch.randn(96, generator=g)).to(dtype)
    residual, normed = (t.cpu() for t in add_rms_norm(*dev(x, delta, w), 1e-5))
    want_res = x + delta
    # Exact in float32; in bfloat16 Triton's interpreter rounds the cast differently from a GPU (1 ulp).
    exact = dict(rtol=0, atol=0) if dtype == torch.float32 else {}
    torch.testing.assert_close(residual, want_res, **exact)
    torch.testing.assert_close(normed, torch.nn.functional.rms_norm(want_res, (96,), w, 1e-5))
    same, normed_x = (t.cpu() for t in add_rms_norm(dev(x)[0], None, dev(w)[0], 1e-5))
    assert torch.equal(same, x)
    torch.testing.assert_close(normed_x, torch.nn.functional.rms_norm(x, (96,), w, 1e-5))
    gate_up = torch.randn(3, 2 * 1100, generator=g).to(dtype)  # more than one column block
    gate, up = gate_up.chunk(2, dim=-1)
    torch.testing.assert_close(silu_mul(dev(gate_up)[0]).cpu(), torch.nn.functional.silu(gate) * up)


@pytest.mark.parametrize("window", [None, 64, 100, 150])
@pytest.mark.parametrize("block_q", [4, 16])
def test_long_prefill_tiles_with_unmasked_key_blocks(window: int | None, block_q: int) -> None:
    """Contexts long enough that tiles have key blocks inside every row's window and causal range (the loop
    that skips the mask), with tiles that straddle the window's edge and the diagonal."""
    lens_new, lens_total = [70, 1, 33], [260, 150, 97]
    q, k, v, tables, seq_lens, query_start = _case(lens_new, lens_total, 8, 2, window, block_size=16, seed=5)
    want = pa.reference_paged_attention(q, k, v, tables, seq_lens, query_start, window)
    seqs, firsts = pa.query_tiles(lens_new, block_q)
    got = pa.paged_attention(*dev(q, k, v, tables, seq_lens, query_start, torch.tensor(seqs, dtype=torch.int32),
                                  torch.tensor(firsts, dtype=torch.int32)), window, block_q).cpu()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
