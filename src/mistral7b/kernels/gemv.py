"""One token through a projection (y = W x, batch 1) as a Triton kernel, with its neighbours folded in.

At batch 1 a decode step is the weights streamed once: the four projections of a layer are matrix-vector
products bound by memory bandwidth. cuBLAS runs Mistral 7B's in 3.78 ms a token on an H200 (wqkv and wo at
2.5-3.2 TB/s); this kernel, tiled per shape from a sweep on that GPU, in 3.50 ms (3.2-4.4 TB/s). Each program
owns BLOCK_N rows and walks K in BLOCK_K steps, keeping a [BLOCK_N, BLOCK_K] float32 partial product, so
every load is a wide contiguous row segment and the reduction happens once at the end.

Neighbours folded in (one-token steps: model/transformer.Transformer._forward_one_token), each measured in
one process on an H200 (bench/gpu_ab.py, bench/README.md):
- `swiglu=True` (w13): a program takes BLOCK_N / 2 gate rows and the matching up rows and writes
  silu(gate) * up, rounded as kernels/norms.silu_mul rounds it, so w2 streams its weights with no exp in its
  loop (the product formed tile by tile in w2's loop, `silu_mul=True`, costs the exps of every row block:
  259.6 -> 263.0 tok/s);
- `norm` (wqkv, output): the RMSNorm before it. Every program walks all of K anyway, so it sums the squares
  of the tiles it loads and scales its float32 sums at the end: no pass, no kernel (261.9 -> 263.0 with
  `residual` below; in w13, whose 4-warp tiles then carry the norm weights too, it cost more than the kernel
  it saves: 259.4 -> 253.8);
- `residual` (w2): the residual add, rounded as kernels/norms.add_rms_norm rounds it, in place;
- `gemv_residual_prenorm` (wo) and `rms` (w13): the norm between them split over the two kernels. wo's GEMV
  adds to the residual (as `residual`), then writes h * w_norm for its rows and its share of the sum of h^2
  (one float a program); w13's GEMV reads those few hundred floats after its loop and scales its sums, so no
  kernel runs between the two (266.5 -> 267.9 tok/s; the partial sums read before the loop instead, kept
  live through it: 253.6 against 260.8);
- `rotary` (wqkv): RoPE of the token's q and k and the k/v store in the paged cache, the arithmetic of
  kernels/rotary_store on the same rounded values (249.4 -> 251.9 tok/s when it came).

On Hopper the kernel is launched with programmatic dependent launch (kernels/pdl.py) and loads its first
weight tile before it waits for the kernel before it.

`project` is the dispatch: a plain nn.Linear on a CUDA float16/bfloat16 weight with one input row takes the
kernel, anything else (batches, quantized or LoRA layers, CPUs) the module itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mistral7b.kernels import pdl
from mistral7b.kernels.norms import silu_mul
from mistral7b.kernels.paged_attention import tl, triton  # None without Triton: `project` falls back

# (BLOCK_N, BLOCK_K, num_warps, num_stages) per (N, K): the fastest of a sweep on an H200 for Mistral 7B's
# projections (bench/README.md), still the fastest in the engine with the folds above (17 other tilings of
# w2, w13, wqkv, wo and the output: 224.5-259.3 tok/s against 259.4); other shapes take DEFAULT. The output's
# was swept again with the final norm folded in, whose h and w_norm every program loads: 4-row programs spent
# half their bytes on them (65.6 us alone on an H200); 8 rows and 4 warps: 61.6 us, the copy rate.
CONFIGS = {
    (6144, 4096): (16, 512, 8, 4),  # wqkv
    (4096, 4096): (8, 512, 8, 4),  # wo
    (28672, 4096): (16, 256, 4, 3),  # w13
    (4096, 14336): (4, 512, 8, 4),  # w2
    (32000, 4096): (8, 1024, 4, 3),  # output, with the final norm folded in (below)
}
DEFAULT = (8, 512, 4, 3)


if triton is not None:
    from mistral7b.kernels.norms import silu_product
    from mistral7b.kernels.pdl import after_previous

    @triton.jit
    def _input_tile(x_ptr, norm_w_ptr, squares, cols, col_ok, K: tl.constexpr, EVEN_K: tl.constexpr,
                    SILU_MUL: tl.constexpr, NORM: tl.constexpr):
        """(x[cols] in float32, squares): silu(gate) * up rounded to the activation dtype with SILU_MUL;
        with NORM x is h[cols] * w_norm[cols] and h[cols]^2 is added to `squares`."""
        if EVEN_K:
            x = tl.load(x_ptr + cols)
        else:
            x = tl.load(x_ptr + cols, mask=col_ok, other=0.0)
        if SILU_MUL:
            if EVEN_K:
                up = tl.load(x_ptr + K + cols)
            else:
                up = tl.load(x_ptr + K + cols, mask=col_ok, other=0.0)
            x = silu_product(x.to(tl.float32), up.to(tl.float32)).to(x_ptr.dtype.element_ty)
        x = x.to(tl.float32)
        if NORM:
            squares += x * x
            if EVEN_K:
                x = x * tl.load(norm_w_ptr + cols).to(tl.float32)
            else:
                x = x * tl.load(norm_w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        return x, squares

    @triton.jit
    def _gemv_kernel(x_ptr, w_ptr, y_ptr, N, K: tl.constexpr,
                     pos_ptr, slot_ptr, inv_freq_ptr, k_ptr, v_ptr, stride_kh, stride_kb, stride_ks,  # ROTARY
                     norm_w_ptr, eps,  # NORM, PRENORM (norm_w_ptr), RMS_PARTS (eps)
                     scaled_ptr, squares_ptr,  # PRENORM (both), RMS_PARTS (squares_ptr)
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, SILU_MUL: tl.constexpr,
                     ROTARY: tl.constexpr, H: tl.constexpr, H_KV: tl.constexpr, D: tl.constexpr,
                     BLOCK_SIZE: tl.constexpr, NORM: tl.constexpr, RESIDUAL: tl.constexpr, SWIGLU: tl.constexpr,
                     PRENORM: tl.constexpr, RMS_PARTS: tl.constexpr, RMS_PAD: tl.constexpr,
                     EARLY_EPILOGUE: tl.constexpr, PDL: tl.constexpr):
        if SWIGLU:  # w13 = [w1 | w3]: gate rows and the up rows N / 2 further, BLOCK_N / 2 of each
            i = tl.arange(0, BLOCK_N)
            out_rows = tl.program_id(0) * (BLOCK_N // 2) + i % (BLOCK_N // 2)
            rows = out_rows + (i // (BLOCK_N // 2)) * (N // 2)
            row_ok = out_rows < N // 2
        else:
            rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
            row_ok = rows < N
        w_rows = w_ptr + rows.to(tl.int64)[:, None] * K
        # Weights do not depend on the kernels before: with PDL the first tile is loaded while they finish.
        # (Asking L2 for more of the rows ahead, with Hopper's bulk prefetch, made batch-1 decode slower:
        # 249.7 -> 237.1 / 229.9 / 219.0 tok/s for 12 / 24 / 48 MB a kernel on an H200.)
        cols = tl.arange(0, BLOCK_K)
        col_ok = cols < K
        w = tl.load(w_rows + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        # wo's epilogue (PRENORM) loads its residual and norm weights before its loop, off the kernel's tail
        # (9.9 against 10.3 us a layer on an H200). Not so elsewhere: w2's residual loaded there made w2 29.5 ->
        # 37.4 us, wqkv's RoPE angles and slot before the wait made wqkv 15.0 -> 19.7 us.
        EARLY: tl.constexpr = RESIDUAL and PRENORM and EARLY_EPILOGUE
        if EARLY:  # weights: before the wait
            w_norm = tl.load(norm_w_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
        after_previous(PDL)
        if EARLY:
            r = tl.load(y_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
        squares = tl.zeros([BLOCK_K], dtype=tl.float32)
        x, squares = _input_tile(x_ptr, norm_w_ptr, squares, cols, col_ok, K, EVEN_K, SILU_MUL, NORM)
        acc = w.to(tl.float32) * x[None, :]
        for k0 in range(BLOCK_K, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            col_ok = cols < K
            if EVEN_K:
                w = tl.load(w_rows + cols[None, :], mask=row_ok[:, None], other=0.0)
            else:
                w = tl.load(w_rows + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
            x, squares = _input_tile(x_ptr, norm_w_ptr, squares, cols, col_ok, K, EVEN_K, SILU_MUL, NORM)
            acc += w.to(tl.float32) * x[None, :]
        y = tl.sum(acc, 1)
        if NORM:  # W (h * w_norm) / rms(h): the sum of squares came with the row's tiles, so it costs no pass
            y = y * (1.0 / tl.sqrt(tl.sum(squares, 0) / K + eps))
        if RMS_PARTS > 0:  # W (h * w_norm) / rms(h), h * w_norm and the squares of h from the kernel before
            parts = tl.arange(0, RMS_PAD)
            part_squares = tl.load(squares_ptr + parts, mask=parts < RMS_PARTS, other=0.0)
            y = y * (1.0 / tl.sqrt(tl.sum(part_squares, 0) / K + eps))
        y = y.to(x_ptr.dtype.element_ty)  # the projection's output dtype (then float32 logits, say, in y_ptr's)
        if SWIGLU:  # silu(gate) * up, rounded as kernels/norms.silu_mul rounds it
            gate, up = tl.split(tl.trans(tl.reshape(y.to(tl.float32), (2, BLOCK_N // 2))))
            out = tl.program_id(0) * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
            product = silu_product(gate, up).to(x_ptr.dtype.element_ty)
            tl.store(y_ptr + out, product.to(y_ptr.dtype.element_ty), mask=out < N // 2)
        elif ROTARY:
            _rotate_store(y, rows, pos_ptr, slot_ptr, inv_freq_ptr, y_ptr, k_ptr, v_ptr, stride_kh, stride_kb,
                          stride_ks, BLOCK_N, H, H_KV, D, BLOCK_SIZE)
        elif RESIDUAL:  # y_ptr is the residual stream: the add, rounded as kernels/norms.add_rms_norm rounds it
            if not EARLY:
                r = tl.load(y_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
            h = (r + y.to(tl.float32)).to(y_ptr.dtype.element_ty)
            tl.store(y_ptr + rows, h, mask=row_ok)
            if PRENORM:  # the next norm's elementwise half, and this program's share of its sum of squares
                h = h.to(tl.float32)
                if not EARLY:
                    w_norm = tl.load(norm_w_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
                tl.store(scaled_ptr + rows, (h * w_norm).to(scaled_ptr.dtype.element_ty), mask=row_ok)
                tl.store(squares_ptr + tl.program_id(0), tl.sum(tl.where(row_ok, h * h, 0.0), 0))
        else:
            tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty), mask=row_ok)

    @triton.jit
    def _rotate_store(y, rows, pos_ptr, slot_ptr, inv_freq_ptr, q_ptr, k_ptr, v_ptr, stride_kh, stride_kb, stride_ks,
                      BLOCK_N: tl.constexpr, H: tl.constexpr, H_KV: tl.constexpr, D: tl.constexpr,
                      BLOCK_SIZE: tl.constexpr):
        """wqkv's rows `rows` (BLOCK_N of one head: BLOCK_N divides D) of the one token: q heads rotated into
        q_ptr, k heads rotated and v heads as they are into their cache slot; the arithmetic of
        kernels/rotary_store on the same rounded values."""
        head = tl.program_id(0) * BLOCK_N // D
        d = tl.program_id(0) * BLOCK_N % D + tl.arange(0, BLOCK_N)
        slot = tl.load(slot_ptr)
        kv_row = (slot // BLOCK_SIZE) * stride_kb + (slot % BLOCK_SIZE) * stride_ks
        if head < H + H_KV:
            even, odd = tl.split(tl.reshape(y.to(tl.float32), (BLOCK_N // 2, 2)))
            half = tl.program_id(0) * BLOCK_N % D // 2 + tl.arange(0, BLOCK_N // 2)
            angle = tl.maximum(tl.load(pos_ptr), 0).to(tl.float32) * tl.load(inv_freq_ptr + half)
            cos = tl.cos(angle)
            sin = tl.sin(angle)
            rotated = tl.reshape(tl.join(even * cos - odd * sin, even * sin + odd * cos), (BLOCK_N,))
            if head < H:
                tl.store(q_ptr + rows, rotated.to(q_ptr.dtype.element_ty))
            else:
                tl.store(k_ptr + (head - H) * stride_kh + kv_row + d, rotated.to(k_ptr.dtype.element_ty))
        else:
            tl.store(v_ptr + (head - H - H_KV) * stride_kh + kv_row + d, y.to(v_ptr.dtype.element_ty))


@dataclass
class Rotary:
    """RoPE for wqkv's q and k heads at `positions` [1], k and v stored at cache slot `slots` [1] of the pools
    [H_kv, num_blocks, block_size, D] (what kernels/rotary_store does after the projection)."""

    positions: torch.Tensor
    slots: torch.Tensor
    inv_freq: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    n_heads: int


def gemv(x: torch.Tensor, weight: torch.Tensor, silu_mul: bool = False, rotary: Rotary | None = None,
         norm: tuple[torch.Tensor, float] | None = None, residual: torch.Tensor | None = None,
         swiglu: bool = False, out_dtype: torch.dtype | None = None,
         rms: tuple[torch.Tensor, float] | None = None) -> torch.Tensor:
    """x [..., K] (one row in all; [..., 2K] = [gate | up] with silu_mul) times weight [N, K]^T -> [..., N].
    With `rotary` (weight = the fused wqkv) k and v go to the cache and only the rotated q is valid.
    With `norm` = (w_norm, eps) x is the residual stream h and the product is W rms_norm(h) (the norm's
    scale applied to the float32 sums, so x is not rounded to the activation dtype first). With `rms` =
    (squares, eps) x is h * w_norm from `gemv_residual_prenorm` and `squares` its partial sums of h^2: the
    product is scaled the same way. With `residual` (one row of N) the product is added to it in place,
    rounded as kernels/norms.add_rms_norm rounds the add, and the residual is returned. With `swiglu` (weight =
    the fused w13 [w1 | w3]) the result is silu(gate) * up [..., N / 2]. `out_dtype`: the result's dtype (the
    sums are rounded to x's first)."""
    return _launch(x, weight, silu_mul, rotary, norm, residual, swiglu, out_dtype, rms, None)[0]


def gemv_residual_prenorm(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor,
                          norm_weight: torch.Tensor, early_epilogue: bool = True
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`gemv(x, weight, residual=residual)` that also starts the RMSNorm after the add: (residual, h * w_norm in
    the activation dtype, float32 partial sums of h^2, one a program), for a `gemv(..., rms=(squares, eps))`
    to finish. So the norm between wo and w13 needs no kernel of its own. `early_epilogue`
    (DecodeTuning.early_epilogue): the residual and norm weights are loaded before the loop over K."""
    residual, scaled, squares = _launch(x, weight, False, None, None, residual, False, None, None, norm_weight,
                                        early_epilogue)
    return residual, scaled, squares


def _launch(x: torch.Tensor, weight: torch.Tensor, silu_mul: bool, rotary: Rotary | None,
            norm: tuple[torch.Tensor, float] | None, residual: torch.Tensor | None, swiglu: bool,
            out_dtype: torch.dtype | None, rms: tuple[torch.Tensor, float] | None,
            prenorm: torch.Tensor | None, early_epilogue: bool = True) -> tuple[torch.Tensor, ...]:
    N, K = weight.shape
    assert weight.is_contiguous() and x.numel() == (2 * K if silu_mul else K)
    assert not (norm is not None and silu_mul) and sum((residual is not None, rotary is not None, swiglu)) <= 1
    assert (prenorm is None or residual is not None) and (norm is None or rms is None)
    flat = x.reshape(-1).contiguous()
    n_out = N // 2 if swiglu else N
    if residual is not None:
        assert residual.is_contiguous() and residual.numel() == N and residual.dtype == x.dtype
        y = residual.view(N)
    else:
        y = torch.empty(n_out, dtype=out_dtype or x.dtype, device=x.device)
    block_n, block_k, warps, stages = CONFIGS.get((N, K), DEFAULT)
    block_k = min(block_k, triton.next_power_of_2(K))
    H = H_kv = D = bs = 1
    pos = slots = inv_freq = k_cache = v_cache = y
    strides = (0, 0, 0)
    if rotary is not None:
        H_kv, _, bs, D = rotary.k_cache.shape
        H = rotary.n_heads
        pos, slots, inv_freq = rotary.positions, rotary.slots, rotary.inv_freq
        k_cache, v_cache, strides = rotary.k_cache, rotary.v_cache, rotary.k_cache.stride()[:3]
        assert N == (H + 2 * H_kv) * D and D % 2 == 0 and rotary.v_cache.stride() == rotary.k_cache.stride()
        while D % block_n or block_n % 2:  # a program's rows stay within one head
            block_n = block_n // 2 if block_n > 2 else 2
    if swiglu:
        assert N % 2 == 0
        block_n = max(2, block_n)
    grid = (triton.cdiv(n_out, block_n // 2) if swiglu else triton.cdiv(N, block_n),)
    norm_w, eps = norm if norm is not None else (y, 0.0)
    scaled = squares = y
    parts = 0
    if prenorm is not None:
        assert prenorm.numel() == N
        norm_w, scaled = prenorm, torch.empty_like(y)
        squares = torch.empty(grid[0], dtype=torch.float32, device=x.device)
    if rms is not None:
        squares, eps = rms
        parts = squares.numel()
        assert squares.dtype == torch.float32 and squares.is_contiguous()
    _gemv_kernel[grid](flat, weight, y, N, K, pos, slots, inv_freq, k_cache, v_cache, *strides, norm_w, eps,
                       scaled, squares,
                       BLOCK_N=block_n, BLOCK_K=block_k, EVEN_K=K % block_k == 0, SILU_MUL=silu_mul,
                       ROTARY=rotary is not None, H=H, H_KV=H_kv, D=D, BLOCK_SIZE=bs, NORM=norm is not None,
                       RESIDUAL=residual is not None, SWIGLU=swiglu, PRENORM=prenorm is not None,
                       RMS_PARTS=parts, RMS_PAD=triton.next_power_of_2(max(parts, 1)),
                       EARLY_EPILOGUE=early_epilogue, num_warps=warps,
                       num_stages=stages, **pdl.options(x.device, 1))
    if residual is not None:
        return (residual, scaled.view(residual.shape), squares) if prenorm is not None else (residual,)
    return (y.view(*x.shape[:-1], n_out),)


def takes_kernel(module: nn.Module, x: torch.Tensor) -> bool:
    """One input row through a plain float16/bfloat16 nn.Linear (no bias) on a CUDA device."""
    if type(module) is not nn.Linear or module.bias is not None:
        return False
    w = module.weight
    return (triton is not None and x.numel() == x.shape[-1] and w.device.type == "cuda"
            and w.dtype in (torch.float16, torch.bfloat16) and x.dtype == w.dtype and w.is_contiguous())


def project(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """module(x), through the GEMV kernel where it applies."""
    return gemv(x, module.weight) if takes_kernel(module, x) else module(x)


def project_swiglu(w2: nn.Module, w13_out: torch.Tensor) -> torch.Tensor:
    """w2(silu(gate) * up) for the fused w13 output [..., 2 * hidden]; one kernel where it applies."""
    if takes_kernel(w2, w13_out[..., : w13_out.shape[-1] // 2]):
        return gemv(w13_out, w2.weight, silu_mul=True)
    return w2(silu_mul(w13_out))
