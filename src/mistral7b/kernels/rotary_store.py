"""One GPU kernel from the fused QKV projection to the paged cache: rotate q and k, store k and v in their slots.

In plain PyTorch this is about ten kernels per layer (splits, float casts, complex views, a multiply, casts
back, two transposed index copies); at batch 1 each costs a launch of a few microseconds, which adds up to
a tenth of a decode step of a 7B model. Here each program takes one head of one token. The rotation is
Mistral's (interleaved pairs, model/rope.py), with angles in float32 from the absolute positions.
"""

from __future__ import annotations

import torch

from mistral7b.kernels import pdl
from mistral7b.kernels.paged_attention import triton, tl


if triton is not None:
    from mistral7b.kernels.pdl import after_previous

    @triton.jit
    def _rotary_store_kernel(qkv_ptr, pos_ptr, inv_freq_ptr, slot_ptr, q_out_ptr, k_ptr, v_ptr,
                             stride_t, stride_qt, stride_qh, stride_kh, stride_kb, stride_ks,
                             H: tl.constexpr, H_KV: tl.constexpr, D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                             PDL: tl.constexpr):
        t = tl.program_id(0)
        h = tl.program_id(1)
        after_previous(PDL)
        half = tl.arange(0, D // 2)
        src = qkv_ptr + t * stride_t + h * D
        slot = tl.load(slot_ptr + t)
        kv_row = (slot // BLOCK_SIZE) * stride_kb + (slot % BLOCK_SIZE) * stride_ks
        if h < H + H_KV:
            pos = tl.maximum(tl.load(pos_ptr + t), 0).to(tl.float32)
            angle = pos * tl.load(inv_freq_ptr + half)
            c = tl.cos(angle)
            s = tl.sin(angle)
            even = tl.load(src + 2 * half).to(tl.float32)
            odd = tl.load(src + 2 * half + 1).to(tl.float32)
            r_even = even * c - odd * s
            r_odd = even * s + odd * c
            if h < H:
                dst = q_out_ptr + t * stride_qt + h * stride_qh
            else:
                dst = k_ptr + (h - H) * stride_kh + kv_row
            tl.store(dst + 2 * half, r_even.to(dst.dtype.element_ty))
            tl.store(dst + 2 * half + 1, r_odd.to(dst.dtype.element_ty))
        else:
            d = tl.arange(0, D)
            dst = v_ptr + (h - H - H_KV) * stride_kh + kv_row
            tl.store(dst + d, tl.load(qkv_ptr + t * stride_t + h * D + d).to(dst.dtype.element_ty))


def rotary_store(qkv: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, slot_mapping: torch.Tensor,
                 k_cache: torch.Tensor, v_cache: torch.Tensor, n_heads: int) -> torch.Tensor:
    """qkv [N, (H + 2 H_kv) * D] (q heads, then k, then v) -> rotated q [N, H, D]; rotated k and v are written
    to the pool [H_kv, num_blocks, block_size, D] at slot_mapping [N] (slot = block * block_size + offset)."""
    H_kv, _, block_size, D = k_cache.shape
    N = qkv.shape[0]
    q = torch.empty((N, n_heads, D), dtype=qkv.dtype, device=qkv.device)
    if N == 0:
        return q
    _rotary_store_kernel[(N, n_heads + 2 * H_kv)](
        qkv, positions, inv_freq, slot_mapping, q, k_cache, v_cache,
        qkv.stride(0), q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        H=n_heads, H_KV=H_kv, D=D, BLOCK_SIZE=block_size, num_warps=1, **pdl.options(qkv.device, N),
    )
    return q
