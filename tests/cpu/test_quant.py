"""The CPU extension's quantized matmuls (mistral7b/cpu/quant.cpp) against float64 matmuls of the dequantized
weights, and the dequantization against its formula, on the build for this process's CPU capability
(tests/cpu/test_capabilities.py runs this file under every capability the CPU has).

Activations are rounded to int16 per block of 32 (step = max |x| / 32767), so the error of a product is bounded:
|y - w . x| <= sum over blocks of step / 2 * sum |w| in the block, plus float32 rounding. The tests hold the
kernels to that bound, which a wrong nibble, scale, block or row would break by orders of magnitude.
"""

from __future__ import annotations

import pytest
import torch

from mistral7b import cpu
from mistral7b.model.quantize import Int4Linear, Int8Linear, pack_int4

pytestmark = pytest.mark.skipif(cpu.load(notice=False) is None, reason="CPU extension not built")


def int4_weights(N, K, G, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (N, K), generator=g, dtype=torch.uint8)
    scales = (torch.rand(N, K // G, generator=g) * 0.05 + 1e-3).half()
    mins = (-torch.rand(N, K // G, generator=g) * 0.4).half()
    w = (q.double().view(N, K // G, G) * scales.double()[..., None] + mins.double()[..., None]).view(N, K)
    return pack_int4(q), scales, mins, w


def int8_weights(N, K, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-127, 128, (N, K), generator=g, dtype=torch.int8)
    scales = (torch.rand(N, K // 32, generator=g) * 0.01 + 1e-4).half()
    w = (q.double().view(N, K // 32, 32) * scales.double()[..., None]).view(N, K)
    return q, scales, w


def activations(M, K, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g) * torch.rand(M, K // 32, 1, generator=g).repeat_interleave(32, -1).view(M, K)
    x[:, :32] *= 0  # a block of zeros (step 0)
    if K >= 96:
        x[:, 64:96] = 1e-3 * torch.randn(M, 32, generator=g)
        x[:, 70] = 300.0  # an outlier: the block's step grows, its small values round coarsely
    return x


def error_bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """[M, N]: int16 rounding of x per block of 32, and float32 accumulation."""
    M, K = x.shape
    step = x.double().abs().view(M, K // 32, 32).amax(-1) / 32767  # [M, blocks]
    w_abs = w.abs().view(w.shape[0], K // 32, 32).sum(-1)  # [N, blocks]
    rounding = 0.5 * step @ w_abs.T
    accumulation = 1e-6 * (x.double().abs() @ w.abs().T)
    return rounding + accumulation


@pytest.mark.parametrize("M", [1, 2, 3, 4, 5, 8, 13, 47])
@pytest.mark.parametrize("N,K,G", [(1, 32, 32), (3, 96, 32), (7, 576, 32), (67, 576, 32), (64, 1024, 256),
                                   (5, 512, 128), (9, 192, 64)])
def test_int4_linear_within_the_int16_rounding(M, N, K, G):
    qweight, scales, mins, w = int4_weights(N, K, G)
    x = activations(M, K)
    y = cpu.load().int4_linear(x, qweight, scales, mins)
    assert y.shape == (M, N) and y.dtype == torch.float32
    ref = x.double() @ w.T
    assert ((y.double() - ref).abs() <= error_bound(x, w)).all()


@pytest.mark.parametrize("M", [1, 2, 3, 4, 6, 17])
@pytest.mark.parametrize("N,K", [(1, 32), (3, 96), (7, 576), (130, 576), (33, 1536)])
def test_int8_linear_within_the_int16_rounding(M, N, K):
    weight, scales, w = int8_weights(N, K)
    x = activations(M, K)
    y = cpu.load().int8_linear(x, weight, scales)
    assert y.shape == (M, N)
    ref = x.double() @ w.T
    assert ((y.double() - ref).abs() <= error_bound(x, w)).all()


def test_bfloat16_activations_give_bfloat16_rows():
    qweight, scales, mins, w = int4_weights(40, 576, 32)
    x = activations(3, 576).bfloat16()
    y = cpu.load().int4_linear(x, qweight, scales, mins)
    assert y.dtype == torch.bfloat16
    ref = x.double() @ w.T
    assert ((y.double() - ref).abs() <= error_bound(x.float(), w) + ref.abs() * 2.0**-8).all()
    weight, s8, w8 = int8_weights(40, 576)
    y8 = cpu.load().int8_linear(x, weight, s8)
    ref8 = x.double() @ w8.T
    assert y8.dtype == torch.bfloat16
    assert ((y8.double() - ref8).abs() <= error_bound(x.float(), w8) + ref8.abs() * 2.0**-8).all()


@pytest.mark.parametrize("G", [32, 64, 128, 256])
def test_int4_dequantize_is_the_formula_exactly(G):
    qweight, scales, mins, w = int4_weights(37, 512, G)
    ops = cpu.load()
    assert torch.equal(ops.int4_dequantize(qweight, scales, mins, torch.float32), w.float())
    assert torch.equal(ops.int4_dequantize(qweight, scales, mins, torch.bfloat16), w.float().bfloat16())


def test_rows_are_independent():
    """Each output row from its own weight row: permuting weight rows permutes outputs (tiles of 4 and 2 rows
    and the leftover rows give the same numbers)."""
    qweight, scales, mins, _ = int4_weights(11, 96, 32)
    perm = torch.randperm(11, generator=torch.Generator().manual_seed(3))
    x = activations(1, 96)
    ops = cpu.load()
    assert torch.equal(ops.int4_linear(x, qweight, scales, mins)[:, perm],
                       ops.int4_linear(x, qweight[perm], scales[perm], mins[perm]))
    x2 = activations(2, 96)
    assert torch.equal(ops.int4_linear(x2, qweight, scales, mins)[:, perm],
                       ops.int4_linear(x2, qweight[perm], scales[perm], mins[perm]))


@pytest.mark.parametrize("kind", ["int4", "int8"])
def test_a_row_gives_the_same_bits_in_any_batch(kind):
    """Activation rows are quantized and multiplied each on its own, in one summation order whatever the tile
    they fall in: a request's numbers do not depend on what it is batched with."""
    ops = cpu.load()
    if kind == "int4":
        qweight, scales, mins, _ = int4_weights(45, 192, 32)
        run = lambda x: ops.int4_linear(x, qweight, scales, mins)  # noqa: E731
    else:
        weight, s8, _ = int8_weights(45, 192)
        run = lambda x: ops.int8_linear(x, weight, s8)  # noqa: E731
    x = activations(11, 192)
    alone = torch.cat([run(x[i : i + 1]) for i in range(11)])
    for M in (2, 3, 4, 5, 11):
        assert torch.equal(run(x[:M]), alone[:M])


def test_bad_inputs_are_one_clear_error():
    ops = cpu.load()
    qweight, scales, mins, _ = int4_weights(4, 64, 32)
    x = torch.randn(2, 64)
    with pytest.raises(RuntimeError, match=r"x: contiguous \[M, 64\]"):
        ops.int4_linear(torch.randn(2, 96), qweight, scales, mins)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        ops.int4_linear(x.double(), qweight, scales, mins)
    with pytest.raises(RuntimeError, match="contiguous"):
        ops.int4_linear(torch.randn(64, 2).T, qweight, scales, mins)
    with pytest.raises(RuntimeError, match="float16"):
        ops.int4_linear(x, qweight, scales.float(), mins)
    with pytest.raises(RuntimeError, match="multiple of 32"):
        ops.int4_linear(torch.randn(2, 48), qweight[:, :24].contiguous(), scales[:, :1].contiguous(),
                        mins[:, :1].contiguous())
    with pytest.raises(RuntimeError, match="at most 16384"):
        ops.int8_linear(torch.randn(1, 16416), torch.zeros(1, 16416, dtype=torch.int8),
                        torch.ones(1, 513, dtype=torch.float16))
    with pytest.raises(RuntimeError, match=r"scales: contiguous float16 \[N, K / 32\]"):
        ops.int8_linear(x, torch.zeros(4, 64, dtype=torch.int8), torch.ones(4, dtype=torch.float16))


@pytest.mark.parametrize("cls", [Int4Linear, Int8Linear])
def test_layers_without_the_extension_compute_the_same(cls, monkeypatch):
    """No extension (no compiler, another architecture): every call dequantizes in PyTorch ops, exactly the
    dense path's numbers; the extension's packed path agrees within its rounding."""
    import mistral7b.model.quantize as quantize

    w = torch.randn(48, 96, generator=torch.Generator().manual_seed(4))
    layer = cls.from_float(w) if cls is Int8Linear else cls.from_float(w, 32, torch.float32)
    x = activations(3, 96)
    with_ext = layer(x)
    monkeypatch.setattr(quantize, "cpu_ops", lambda: None)
    dense = torch.nn.functional.linear(x, layer.dequantize())
    assert torch.equal(layer(x), dense)
    assert ((with_ext.double() - dense.double()).abs() <= error_bound(x, layer.dequantize().double()) + 1e-5).all()
