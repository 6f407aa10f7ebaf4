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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,k", [(24, 64), (37, 96), (8, 520)])
def test_norm_folded_into_gemv_equals_rms_norm_then_projection(n, k, dtype):
    """W rms_norm(h) with the norm in the kernel: the sum of squares gathered from the tiles the product loads
    anyway (K not a multiple of the tile too), the scale applied to the float32 sums."""
    from mistral7b.kernels.gemv import gemv

    w, h = _weights(n, k, dtype, seed=3)
    h = h * 3.0  # an rms far from 1, so a missing or misplaced scale shows
    norm_w = torch.rand(k, generator=torch.Generator().manual_seed(4)).to(DEVICE, dtype) + 0.5
    got = gemv(h, w, norm=(norm_w, 1e-5))
    hd = h.double()
    normed = hd * torch.rsqrt(hd.pow(2).mean(-1, keepdim=True) + 1e-5) * norm_w.double()
    want = normed @ w.double().T
    assert got.shape == (1, 1, n) and got.dtype == dtype
    if dtype == torch.float32:
        assert ((got.double() - want).abs() / want.abs().clamp_min(1.0)).max().item() < 1e-5
    else:
        assert_bf16_close(got, want)


@pytest.mark.parametrize("silu", [False, True])
def test_residual_epilogue_equals_the_add_of_add_rms_norm(silu):
    """wo / w2 with the residual add in the epilogue: the residual stream afterwards is bit for bit what
    kernels/norms.add_rms_norm makes of the unfused projection's output, and it is updated in place."""
    from mistral7b.kernels.gemv import gemv
    from mistral7b.kernels.norms import add_rms_norm, silu_mul

    k, n = 64, 48
    w, _ = _weights(n, k, torch.bfloat16, seed=5)
    g = torch.Generator().manual_seed(6)
    x = torch.randn(1, 2 * k if silu else k, generator=g).to(DEVICE, torch.bfloat16)
    residual = torch.randn(1, n, generator=g).to(DEVICE, torch.bfloat16)
    delta = gemv(silu_mul(x) if silu else x, w)
    want, _ = add_rms_norm(residual, delta, torch.ones(n, device=DEVICE, dtype=torch.bfloat16), 1e-5)
    got = residual.clone()
    out = gemv(x, w, silu_mul=silu, residual=got)
    assert out is got and not torch.equal(got, residual)
    assert torch.equal(got, want)


def test_norm_and_rotary_together_equal_normed_input_then_rotary():
    """wqkv's GEMV with the attention norm folded in as well as RoPE and the cache store (a one-token step's
    first kernel of a layer) == the norm, then the GEMV with RoPE."""
    from mistral7b.kernels import gemv as gemv_module

    H, H_kv, D, K, bs = 4, 2, 16, 48, 4
    N = (H + 2 * H_kv) * D
    w, h = _weights(N, K, torch.float32, seed=7)
    norm_w = torch.rand(K, generator=torch.Generator().manual_seed(8)).to(DEVICE) + 0.5
    normed = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * norm_w
    inv_freq = torch.rand(D // 2, generator=torch.Generator().manual_seed(9)).to(DEVICE)
    pos, slots = torch.tensor([37], device=DEVICE), torch.tensor([9], device=DEVICE)
    caches = torch.zeros(4, H_kv, 3, bs, D, device=DEVICE)
    want = gemv_module.gemv(normed, w, rotary=gemv_module.Rotary(pos, slots, inv_freq, caches[0], caches[1], H))
    got = gemv_module.gemv(h, w, rotary=gemv_module.Rotary(pos, slots, inv_freq, caches[2], caches[3], H),
                           norm=(norm_w, 1e-6))
    torch.testing.assert_close(got.view(-1)[: H * D], want.view(-1)[: H * D], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(caches[2:], caches[:2], rtol=1e-5, atol=1e-5)
    assert caches[3].abs().sum() > 0


@pytest.mark.parametrize("n,block_n", [(48, 16), (40, 8), (26, 4)])
def test_swiglu_epilogue_equals_the_product_of_the_two_halves(n, block_n, monkeypatch):
    """w13's GEMV with SwiGLU's product formed in its epilogue (each program takes BLOCK_N / 2 gate rows and
    the up rows N / 2 further; halves that do not fill the last program too) == silu_mul of the plain GEMV, bit
    for bit; the float32 output is the same values."""
    from mistral7b.kernels import gemv as gemv_module
    from mistral7b.kernels.norms import silu_mul

    k = 96
    monkeypatch.setitem(gemv_module.CONFIGS, (n, k), (block_n, 64, 4, 2))
    w13, x = _weights(n, k, torch.bfloat16, seed=11)
    want = silu_mul(gemv_module.gemv(x, w13))
    got = gemv_module.gemv(x, w13, swiglu=True)
    assert got.shape == (1, 1, n // 2) and torch.equal(got, want)
    wide = gemv_module.gemv(x, w13, swiglu=True, out_dtype=torch.float32)
    assert wide.dtype == torch.float32 and torch.equal(wide, want.float())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norm_started_in_wo_and_finished_in_w13_equals_add_rms_norm_then_projection(dtype, monkeypatch):
    """wo's GEMV adding to the residual and starting the next RMSNorm (h * w_norm and per-program sums of h^2,
    rows that do not fill the last program too), w13's finishing it from those sums: the residual is bit for
    bit add_rms_norm's, the product W rms_norm(h) within rounding of the exact one."""
    from mistral7b.kernels import gemv as gemv_module
    from mistral7b.kernels.norms import add_rms_norm

    n, k, n2 = 40, 64, 24
    monkeypatch.setitem(gemv_module.CONFIGS, (n, k), (16, 32, 4, 2))  # 3 programs, the last one half full
    wo, x = _weights(n, k, dtype, seed=12)
    w13, _ = _weights(n2, n, dtype, seed=13)
    g = torch.Generator().manual_seed(14)
    residual = (torch.randn(1, 1, n, generator=g) * 3.0).to(DEVICE, dtype)
    norm_w = (torch.rand(n, generator=g) + 0.5).to(DEVICE, dtype)
    want_residual, _ = add_rms_norm(residual, gemv_module.gemv(x, wo), norm_w, 1e-5)
    got_residual, scaled, squares = gemv_module.gemv_residual_prenorm(x, wo, residual.clone(), norm_w)
    assert torch.equal(got_residual, want_residual) and squares.shape == (3,)
    h = want_residual.double()
    torch.testing.assert_close(squares.double().sum(), h.pow(2).sum(), rtol=1e-6, atol=0)
    assert_bf16_close(scaled, h * norm_w.double())  # (bfloat16 rounds it: the interpreter truncates)
    got = gemv_module.gemv(scaled, w13, rms=(squares, 1e-5))
    # the exact product of the rounded h * w_norm, scaled by the exact 1 / rms(h): one rounding away
    want = (scaled.double() @ w13.double().T) * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5)
    assert got.shape == (1, 1, n2) and got.dtype == dtype
    if dtype == torch.float32:
        assert ((got.double() - want).abs() / want.abs().clamp_min(1.0)).max().item() < 1e-5
    else:
        assert_bf16_close(got, want)
