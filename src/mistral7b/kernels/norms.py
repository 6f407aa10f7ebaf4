"""Fused residual add + RMSNorm, and SwiGLU's silu(gate) * up, as single GPU kernels.

At batch 1 a 7B decode step spends about a tenth of its time in small elementwise kernels: PyTorch's
RMSNorm takes ~6 us per call on a 4096-wide row (one thread block), and every residual add and the SwiGLU
product is a launch of its own. Here the residual add feeds the norm that follows it in one pass
(`add_rms_norm`: residual += delta, then normed = rms_norm(residual) * weight, both stored), as vLLM and
llama.cpp do, and the gate and up halves of the fused w13 output meet in one kernel. Sums are in float32.
"""

from __future__ import annotations

import torch

from mistral7b.kernels import pdl
from mistral7b.kernels.paged_attention import tl, triton

if triton is not None:
    from mistral7b.kernels.pdl import after_previous

    @triton.jit
    def silu_product(gate, up):
        """silu(gate) * up in float32 (callers round it to the activation dtype): SwiGLU's product, shared by
        the kernel below and w2's GEMV (kernels/gemv.py) so both round it the same way."""
        return gate / (1.0 + tl.exp(-gate)) * up

    @triton.jit
    def _add_rms_norm_kernel(x_ptr, delta_ptr, w_ptr, out_ptr, res_ptr, n_cols, eps,
                             HAS_DELTA: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        ok = cols < n_cols
        after_previous(PDL)
        x = tl.load(x_ptr + row * n_cols + cols, mask=ok, other=0.0).to(tl.float32)
        if HAS_DELTA:
            x += tl.load(delta_ptr + row * n_cols + cols, mask=ok, other=0.0).to(tl.float32)
            x = x.to(res_ptr.dtype.element_ty)
            tl.store(res_ptr + row * n_cols + cols, x, mask=ok)
            x = x.to(tl.float32)
        inv = 1.0 / tl.sqrt(tl.sum(x * x, 0) / n_cols + eps)
        w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * n_cols + cols, (x * inv * w).to(out_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _silu_mul_kernel(x_ptr, out_ptr, hidden, BLOCK: tl.constexpr, PDL: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = cols < hidden
        after_previous(PDL)
        gate = tl.load(x_ptr + row * 2 * hidden + cols, mask=ok, other=0.0).to(tl.float32)
        up = tl.load(x_ptr + row * 2 * hidden + hidden + cols, mask=ok, other=0.0).to(tl.float32)
        out = silu_product(gate, up)
        tl.store(out_ptr + row * hidden + cols, out.to(out_ptr.dtype.element_ty), mask=ok)


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(residual, normed) for rows x [..., dim]: residual = x + delta (x itself when delta is None) rounded to
    x's dtype, normed = rms_norm(residual) * weight. New tensors; x is not changed."""
    dim = x.shape[-1]
    flat = x.reshape(-1, dim).contiguous()
    rows = flat.shape[0]
    residual = flat if delta is None else torch.empty_like(flat)
    normed = torch.empty_like(flat)
    if rows:
        d = flat if delta is None else delta.reshape(-1, dim).contiguous()
        block = triton.next_power_of_2(dim)
        _add_rms_norm_kernel[(rows,)](flat, d, weight, normed, residual, dim, eps, HAS_DELTA=delta is not None,
                                      BLOCK=block, num_warps=8 if block >= 4096 else 4, **pdl.options(x.device, rows))
    return residual.view(x.shape), normed.view(x.shape)


def silu_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for x [..., 2 * hidden] = [gate | up] (the fused w13 projection) -> [..., hidden]."""
    hidden = x.shape[-1] // 2
    flat = x.reshape(-1, 2 * hidden).contiguous()
    out = torch.empty((flat.shape[0], hidden), dtype=x.dtype, device=x.device)
    if flat.shape[0]:
        block = 1024
        _silu_mul_kernel[(flat.shape[0], triton.cdiv(hidden, block))](flat, out, hidden, BLOCK=block, num_warps=4,
                                                                      **pdl.options(x.device, flat.shape[0]))
    return out.view(*x.shape[:-1], hidden)
