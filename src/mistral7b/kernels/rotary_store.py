"""One GPU kernel from the fused QKV projection to the paged cache: rotate q and k, store k and v in their slots.

In plain PyTorch this is about ten kernels per layer (splits, float casts, complex views, a multiply, casts
back, two transposed index copies); at batch 1 each costs a launch of a few microseconds, which adds up to
a tenth of a decode step of a 7B model. Here each program takes HEADS q, k or v heads of one token (6
programs a token for Mistral), loading and storing whole rows and pairing the rotated halves in registers. One
program per head was 5x slower than the bytes allow on an
H200 for an 8K-token pre-fill chunk (240 us a layer: 400K programs of 256 bytes). The rotation is
Mistral's (interleaved pairs, model/rope.py), with angles in float32 from the absolute positions.
"""

from __future__ import annotations

import torch

from mistral7b.kernels import pdl
from mistral7b.kernels.paged_attention import triton, tl


if triton is not None:
    from mistral7b.kernels.pdl import after_previous

    @triton.jit
    def _store_rows(src, dst, ok, c, s, HEADS: tl.constexpr, D: tl.constexpr, ROTATE: tl.constexpr):
        """Rows of HEADS heads from src to dst ([HEADS, D] pointers), rotated by (c, s) [1, D / 2] if ROTATE:
        whole rows are loaded and stored (coalesced), the pairs split and joined in registers."""
        x = tl.load(src, mask=ok[:, None], other=0.0)
        if ROTATE:
            even, odd = tl.split(tl.reshape(x.to(tl.float32), (HEADS, D // 2, 2)))
            x = tl.reshape(tl.join(even * c - odd * s, even * s + odd * c), (HEADS, D))
        tl.store(dst, x.to(dst.dtype.element_ty), mask=ok[:, None])

    @triton.jit
    def _rotary_store_kernel(qkv_ptr, pos_ptr, inv_freq_ptr, slot_ptr, q_out_ptr, k_ptr, v_ptr,
                             stride_t, stride_qt, stride_qh, stride_kh, stride_kb, stride_ks,
                             H: tl.constexpr, H_KV: tl.constexpr, D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                             HEADS: tl.constexpr, PDL: tl.constexpr):
        t = tl.program_id(0)
        p = tl.program_id(1)  # programs of q heads, then of k heads, then of v heads
        Q_PROGRAMS: tl.constexpr = (H + HEADS - 1) // HEADS
        KV_PROGRAMS: tl.constexpr = (H_KV + HEADS - 1) // HEADS
        after_previous(PDL)
        j = tl.arange(0, HEADS)
        d = tl.arange(0, D)[None, :]
        half = tl.arange(0, D // 2)
        pos = tl.maximum(tl.load(pos_ptr + t), 0).to(tl.float32)
        angle = (pos * tl.load(inv_freq_ptr + half))[None, :]
        row = qkv_ptr + t * stride_t
        if p < Q_PROGRAMS:
            h = p * HEADS + j
            _store_rows(row + h[:, None] * D + d, q_out_ptr + t * stride_qt + h[:, None] * stride_qh + d, h < H,
                        tl.cos(angle), tl.sin(angle), HEADS, D, True)
        else:
            slot = tl.load(slot_ptr + t)
            kv_row = (slot // BLOCK_SIZE) * stride_kb + (slot % BLOCK_SIZE) * stride_ks
            if p < Q_PROGRAMS + KV_PROGRAMS:
                h = (p - Q_PROGRAMS) * HEADS + j
                _store_rows(row + (H + h[:, None]) * D + d, k_ptr + h[:, None] * stride_kh + kv_row + d, h < H_KV,
                            tl.cos(angle), tl.sin(angle), HEADS, D, True)
            else:
                h = (p - Q_PROGRAMS - KV_PROGRAMS) * HEADS + j
                _store_rows(row + (H + H_KV + h[:, None]) * D + d, v_ptr + h[:, None] * stride_kh + kv_row + d,
                            h < H_KV, angle, angle, HEADS, D, False)


HEADS = 8  # heads a program
WARPS = 2


def rotary_store(qkv: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, slot_mapping: torch.Tensor,
                 k_cache: torch.Tensor, v_cache: torch.Tensor, n_heads: int) -> torch.Tensor:
    """qkv [N, (H + 2 H_kv) * D] (q heads, then k, then v) -> rotated q [N, H, D]; rotated k and v are written
    to the pool [H_kv, num_blocks, block_size, D] at slot_mapping [N] (slot = block * block_size + offset)."""
    H_kv, _, block_size, D = k_cache.shape
    N = qkv.shape[0]
    q = torch.empty((N, n_heads, D), dtype=qkv.dtype, device=qkv.device)
    if N == 0:
        return q
    _rotary_store_kernel[(N, triton.cdiv(n_heads, HEADS) + 2 * triton.cdiv(H_kv, HEADS))](
        qkv, positions, inv_freq, slot_mapping, q, k_cache, v_cache,
        qkv.stride(0), q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        H=n_heads, H_KV=H_kv, D=D, BLOCK_SIZE=block_size, HEADS=HEADS, num_warps=WARPS, **pdl.options(qkv.device, N),
    )
    return q
