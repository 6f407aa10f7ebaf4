"""The one-row projection kernel (kernels/gemv.py) against PyTorch, through Triton's interpreter on a CPU (the
compiled kernel on a GPU): row counts that do not fill the last tile, K below / equal to / not a multiple of
the K tile, SwiGLU's product fused into w2, and the dispatch that keeps batches and other layers off it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mistral7b import kernels

pytestmark = pytest.mark.skipif(not kernels.available(), reason="triton is not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _weights(n: int, k: int, dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, k, generator=g).to(DEVICE, dtype), torch.randn(1, 1, k, generator=g).to(DEVICE, dtype))


def assert_bf16_close(got: torch.Tensor, want: torch.Tensor) -> None:
    """Within one bfloat16 step of the exact sums (Triton's interpreter truncates when it rounds to bfloat16)."""
    step = 2.0 ** (torch.floor(torch.log2(want.abs().clamp_min(1e-3))) - 7)
    assert ((got.double() - want).abs() <= step + 1e-4).all(), (got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,k", [(16, 64), (37, 96), (9, 1024), (40, 520)])
def test_gemv_matches_matmul(n, k, dtype):
    from mistral7b.kernels.gemv import gemv

    w, x = _weights(n, k, dtype)
    got = gemv(x, w)
    want = (x.double() @ w.double().T)
    assert got.shape == (1, 1, n) and got.dtype == dtype
    if dtype == torch.float32:
        assert ((got.double() - want).abs() / want.abs().clamp_min(1.0)).max().item() < 1e-5
    else:
        assert_bf16_close(got, want)


@pytest.mark.parametrize("k", [64, 96])
def test_swiglu_fused_into_w2_equals_the_separate_product(k):
    from mistral7b.kernels.gemv import gemv
    from mistral7b.kernels.norms import silu_mul

    w2, _ = _weights(24, k, torch.bfloat16, seed=1)
    w13_out = torch.randn(1, 2 * k, generator=torch.Generator().manual_seed(2)).to(DEVICE, torch.bfloat16)
    fused = gemv(w13_out, w2, silu_mul=True)
    assert torch.equal(fused, gemv(silu_mul(w13_out), w2))  # same rounding of the product, same sums
    want = silu_mul(w13_out).double() @ w2.double().T  # silu_mul itself: tests/kernels/test_paged_attention.py
    assert_bf16_close(fused, want)


def test_dispatch_takes_only_one_row_through_plain_float_linears():
    from mistral7b.kernels.gemv import project, takes_kernel

    layer = nn.Linear(32, 8, bias=False).to(torch.bfloat16)
    one, two = torch.randn(1, 1, 32, dtype=torch.bfloat16), torch.randn(1, 2, 32, dtype=torch.bfloat16)
    assert not takes_kernel(layer, one)  # weights on a CPU: the module itself
    assert torch.equal(project(layer, two), layer(two))
    if torch.cuda.is_available():
        layer = layer.cuda()
        assert takes_kernel(layer, one.cuda()) and not takes_kernel(layer, two.cuda())
        assert not takes_kernel(layer.float(), one.cuda().float())  # float32 keeps cuBLAS
        assert not takes_kernel(nn.Linear(32, 8).cuda().bfloat16(), one.cuda())  # a bias


@pytest.mark.parametrize("block_n", [4, 8, 16, 32])
def test_rotary_epilogue_equals_rotary_store(block_n, monkeypatch):
    """wqkv's GEMV with RoPE and the cache store folded in == the GEMV, then kernels/rotary_store."""
    from mistral7b.kernels import gemv as gemv_module
    from mistral7b.kernels.rotary_store import rotary_store
    from mistral7b.model.rope import inv_frequencies

    H, H_kv, D, K, bs = 4, 2, 16, 48, 4
    N = (H + 2 * H_kv) * D
    monkeypatch.setitem(gemv_module.CONFIGS, (N, K), (block_n, 64, 4, 2))  # 32: halved to stay in one head
    w, x = _weights(N, K, torch.float32, seed=9)
    inv_freq = inv_frequencies(D, 1e6, DEVICE)
    for position, slot in ((0, 1), (4095, 13), (70000, 7)):
        pos, slots = torch.tensor([position], device=DEVICE), torch.tensor([slot], device=DEVICE)
        k_want, v_want = torch.zeros(2, H_kv, 5, bs, D, device=DEVICE)
        q_want = rotary_store(gemv_module.gemv(x, w).view(1, N), pos, inv_freq, slots, k_want, v_want, H)
        k_got, v_got = torch.zeros(2, H_kv, 5, bs, D, device=DEVICE)
        y = gemv_module.gemv(x, w, rotary=gemv_module.Rotary(pos, slots, inv_freq, k_got, v_got, H))
        torch.testing.assert_close(y.view(-1)[: H * D].view(H, D), q_want[0], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(k_got, k_want, rtol=1e-6, atol=1e-6)
        assert torch.equal(v_got, v_want) and v_got.abs().sum() > 0
