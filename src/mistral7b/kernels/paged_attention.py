"""Paged attention on a GPU: one Triton kernel for decode rows and pre-fill chunks, GQA- and window-aware.

Each program takes one tile of a sequence's new tokens (`block_q` queries) and one KV head, and reads keys
and values straight from the paged pool [n_kv_heads, num_blocks, block_size, head_dim] through the sequence's
block table: no gather copy, and with a sliding window W the loop starts at the first key the tile's earliest
query may see, so the work per query is bounded by W (not by the context length). The G = n_heads / n_kv_heads
query heads that share a KV head are packed into the rows of one matrix product (rows = queries x heads), so
each key block is loaded once for its whole group.

Decode steps with few sequences cannot fill the GPU with one program per (sequence, KV head); `num_splits`
then divides each sequence's key range over several programs that write partial results (running max, sum
and unnormalised output), merged by a second small kernel (flash-decoding). Pre-fill tiles run their
key blocks that need no mask (inside every row's window and causal range) without one.

The launch is fixed-shape given (tiles, splits), so a decode step can be captured in a CUDA graph: nothing
here reads a value back to the host. With programmatic dependent launch (one-token steps, kernels/pdl.py) the
step's metadata is read before the wait for the kernel before (batch 1 on an H200: 8.4 -> 7.7 us a layer,
259.6 -> 260.8 tok/s, with each split's values loaded with its keys, which alone is within noise), and a
split's first key block of earlier steps is loaded before it too: only this step's kernels write the new
tokens' rows, which are loaded again after the wait (DecodeTuning.kv_before_wait; same-process A/B 265.8 ->
268.5 tok/s).
`reference_paged_attention` is the same computation in PyTorch, the oracle of the tests (which also run the
kernel itself under TRITON_INTERPRET=1 on a CPU).
"""

from __future__ import annotations

import math

import torch

from mistral7b.kernels import pdl

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs without Triton: the kernel is unavailable, the PyTorch paths remain
    triton = None
    tl = None

# The running max starts at -1e30, not -inf, so a tile that sees no key in an iteration stays NaN-free.


def query_tiles(query_lens: list[int], block_q: int) -> tuple[list[int], list[int]]:
    """(sequence, first query) of each tile: ceil(len / block_q) tiles per sequence, in order."""
    seqs, firsts = [], []
    for s, n in enumerate(query_lens):
        for q0 in range(0, n, block_q):
            seqs.append(s)
            firsts.append(q0)
    return seqs, firsts


if triton is not None:
    from mistral7b.kernels.pdl import after_previous

    @triton.jit
    def _kv_rows(start, hi, seq, kvh, block_tables_ptr, stride_bt, stride_kh, stride_kb, stride_ks,
                 BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr):
        """Pool offsets of the BLOCK_N keys from `start` (through the block table), their positions, and which
        are below `hi`."""
        k_pos = start + tl.arange(0, BLOCK_N)
        k_ok = k_pos < hi
        block = tl.load(block_tables_ptr + seq * stride_bt + k_pos // BLOCK_SIZE, mask=k_ok, other=0)
        return kvh * stride_kh + block.to(tl.int64) * stride_kb + (k_pos % BLOCK_SIZE) * stride_ks, k_pos, k_ok

    @triton.jit
    def _softmax_step(s, m_i, l_i, k_pos, k_ok, q_pos, window, MASKED: tl.constexpr):
        """Scores s (base 2) of one key block into the running max and sum: (probabilities, the factor that
        rescales the accumulator, new max, new sum)."""
        if MASKED:
            allowed = (k_pos[None, :] <= q_pos[:, None]) & k_ok[None, :]
            if window > 0:
                allowed = allowed & (q_pos[:, None] - k_pos[None, :] < window)
            s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        return p, alpha, m_new, l_i * alpha + tl.sum(p, 1)

    @triton.jit
    def _attend_keys(q, acc, m_i, l_i, start, q_pos, hi, window, seq, kvh, k_ptr, v_ptr, block_tables_ptr,
                     stride_bt, stride_kh, stride_kb, stride_ks, scale_log2,
                     BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, D: tl.constexpr, MASKED: tl.constexpr,
                     PRECISION: tl.constexpr, V_EARLY: tl.constexpr = False):
        """One block of BLOCK_N keys from `start` into the running (acc, max, sum); scores in base 2. With
        V_EARLY the values are loaded with the keys (a split of one or two blocks: no loop to pipeline them)."""
        kv_rows, k_pos, k_ok = _kv_rows(start, hi, seq, kvh, block_tables_ptr, stride_bt, stride_kh, stride_kb,
                                        stride_ks, BLOCK_N, BLOCK_SIZE)
        d = tl.arange(0, D)
        k = tl.load(k_ptr + kv_rows[:, None] + d[None, :], mask=k_ok[:, None], other=0.0)
        if V_EARLY:
            v = tl.load(v_ptr + kv_rows[:, None] + d[None, :], mask=k_ok[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
        p, alpha, m_new, l_i = _softmax_step(s, m_i, l_i, k_pos, k_ok, q_pos, window, MASKED)
        if not V_EARLY:
            v = tl.load(v_ptr + kv_rows[:, None] + d[None, :], mask=k_ok[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        return acc, m_new, l_i

    # Integers that change from step to step are not specialised on (Triton compiles a variant for a value of 1
    # and for multiples of 16): each variant is a compile of about a second, met first in the middle of serving.
    @triton.jit(do_not_specialize=["n_tokens", "stride_bt"])
    def _paged_attention_kernel(
        q_ptr, k_ptr, v_ptr, out_ptr, part_ptr, stat_ptr,
        block_tables_ptr, seq_lens_ptr, query_start_ptr, tile_seq_ptr, tile_q_ptr,
        scale, window, n_tokens, n_heads,
        stride_qt, stride_qh, stride_kh, stride_kb, stride_ks, stride_bt, stride_ot, stride_oh,
        G: tl.constexpr, G_PAD: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_SIZE: tl.constexpr, D: tl.constexpr, SPLITS: tl.constexpr,
        PRECISION: tl.constexpr, PDL: tl.constexpr, V_EARLY: tl.constexpr, KV_EARLY: tl.constexpr,
    ):
        tile = tl.program_id(0)
        kvh = tl.program_id(1)
        split = tl.program_id(2)
        # The step's metadata is written before its first kernel (host copies, or a graph's inputs), so with
        # PDL it is read while the kernel before finishes; q and the new token's key and value only after.
        seq = tl.load(tile_seq_ptr + tile)
        q0 = tl.load(tile_q_ptr + tile)
        q_begin = tl.load(query_start_ptr + seq)
        n_q = tl.load(query_start_ptr + seq + 1) - q_begin
        seq_len = tl.load(seq_lens_ptr + seq)  # keys = positions 0 .. seq_len - 1, the new tokens last
        first_pos = seq_len - n_q + q0
        last_pos = tl.minimum(first_pos + BLOCK_Q - 1, seq_len - 1)
        lo = first_pos * 0
        if window > 0:
            lo = tl.maximum(first_pos - window + 1, 0)
        lo = (lo // BLOCK_N) * BLOCK_N
        hi = last_pos + 1
        if SPLITS > 1:  # this program's share of the key blocks
            n_iter = tl.cdiv(hi - lo, BLOCK_N)
            per = tl.cdiv(n_iter, SPLITS)
            lo_s = lo + split * per * BLOCK_N
            hi = tl.minimum(hi, lo_s + per * BLOCK_N)
            lo = lo_s
        d = tl.arange(0, D)
        if KV_EARLY:
            # The first key block's keys and values of earlier steps, before the wait: only this step's
            # kernels write the new tokens' rows, and the kernels of the step before have all finished (at
            # least one kernel of every step, as the embedding lookup, launches without PDL).
            kv0, k_pos0, k_ok0 = _kv_rows(lo, hi, seq, kvh, block_tables_ptr, stride_bt, stride_kh, stride_kb,
                                          stride_ks, BLOCK_N, BLOCK_SIZE)
            old = k_ok0 & (k_pos0 < seq_len - n_q)
            k0 = tl.load(k_ptr + kv0[:, None] + d[None, :], mask=old[:, None], other=0.0)
            v0 = tl.load(v_ptr + kv0[:, None] + d[None, :], mask=old[:, None], other=0.0)
        after_previous(PDL)

        rows = tl.arange(0, BLOCK_Q * G_PAD)
        qi = q0 + rows // G_PAD
        g = rows % G_PAD
        row_ok = (qi < n_q) & (g < G)
        q_pos = seq_len - n_q + qi
        q_rows = (q_begin + qi) * stride_qt + (kvh * G + g) * stride_qh
        q = tl.load(q_ptr + q_rows[:, None] + d[None, :], mask=row_ok[:, None], other=0.0)

        m_i = tl.full([BLOCK_Q * G_PAD], -1.0e30, dtype=tl.float32)
        l_i = tl.zeros([BLOCK_Q * G_PAD], dtype=tl.float32)
        acc = tl.zeros([BLOCK_Q * G_PAD, D], dtype=tl.float32)
        scale_log2 = scale * 1.4426950408889634  # exp(x) = exp2(x log2 e)
        if SPLITS == 1:
            # Key blocks every row of the tile may see (no mask): after the window's edge for the last query,
            # up to the first query's own position. Masked blocks before and after.
            full_lo = lo
            if window > 0:
                full_lo = tl.maximum(tl.cdiv(last_pos - window + 1, BLOCK_N) * BLOCK_N, lo)
            full_hi = tl.maximum((first_pos + 1) // BLOCK_N * BLOCK_N, full_lo)
            for start in range(lo, full_lo, BLOCK_N):
                acc, m_i, l_i = _attend_keys(q, acc, m_i, l_i, start, q_pos, hi, window, seq, kvh, k_ptr, v_ptr,
                                             block_tables_ptr, stride_bt, stride_kh, stride_kb, stride_ks,
                                             scale_log2, BLOCK_N, BLOCK_SIZE, D, True, PRECISION)
            for start in range(full_lo, full_hi, BLOCK_N):
                acc, m_i, l_i = _attend_keys(q, acc, m_i, l_i, start, q_pos, hi, window, seq, kvh, k_ptr, v_ptr,
                                             block_tables_ptr, stride_bt, stride_kh, stride_kb, stride_ks,
                                             scale_log2, BLOCK_N, BLOCK_SIZE, D, False, PRECISION)
            for start in range(full_hi, hi, BLOCK_N):
                acc, m_i, l_i = _attend_keys(q, acc, m_i, l_i, start, q_pos, hi, window, seq, kvh, k_ptr, v_ptr,
                                             block_tables_ptr, stride_bt, stride_kh, stride_kb, stride_ks,
                                             scale_log2, BLOCK_N, BLOCK_SIZE, D, True, PRECISION)
        elif KV_EARLY:
            new = k_ok0 & (k_pos0 >= seq_len - n_q)
            k0 = tl.where(new[:, None], tl.load(k_ptr + kv0[:, None] + d[None, :], mask=new[:, None], other=0.0), k0)
            v0 = tl.where(new[:, None], tl.load(v_ptr + kv0[:, None] + d[None, :], mask=new[:, None], other=0.0), v0)
            s = tl.dot(q, tl.trans(k0), input_precision=PRECISION) * scale_log2
            p, alpha, m_i, l_i = _softmax_step(s, m_i, l_i, k_pos0, k_ok0, q_pos, window, True)
            acc = acc * alpha[:, None] + tl.dot(p.to(v0.dtype), v0, input_precision=PRECISION)
            for start in range(lo + BLOCK_N, hi, BLOCK_N):
                acc, m_i, l_i = _attend_keys(q, acc, m_i, l_i, start, q_pos, hi, window, seq, kvh, k_ptr, v_ptr,
                                             block_tables_ptr, stride_bt, stride_kh, stride_kb, stride_ks,
                                             scale_log2, BLOCK_N, BLOCK_SIZE, D, True, PRECISION, V_EARLY)
        else:
            for start in range(lo, hi, BLOCK_N):
                acc, m_i, l_i = _attend_keys(q, acc, m_i, l_i, start, q_pos, hi, window, seq, kvh, k_ptr, v_ptr,
                                             block_tables_ptr, stride_bt, stride_kh, stride_kb, stride_ks,
                                             scale_log2, BLOCK_N, BLOCK_SIZE, D, True, PRECISION, V_EARLY)

        heads = kvh * G + g
        if SPLITS == 1:
            out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
            o_rows = (q_begin + qi) * stride_ot + heads * stride_oh
            tl.store(out_ptr + o_rows[:, None] + d[None, :], out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
        else:  # partials [SPLITS, tokens, heads, D] and stats [2, SPLITS, tokens, heads] (max, sum), float32
            flat = (split * n_tokens + q_begin + qi) * n_heads + heads
            tl.store(part_ptr + flat[:, None] * D + d[None, :], acc, mask=row_ok[:, None])
            tl.store(stat_ptr + flat, m_i, mask=row_ok)
            tl.store(stat_ptr + SPLITS * n_tokens * n_heads + flat, l_i, mask=row_ok)


    @triton.jit(do_not_specialize=["n_tokens"])
    def _merge_kernel(part_ptr, stat_ptr, out_ptr, n_tokens, n_heads, stride_ot, stride_oh,
                      SPLITS: tl.constexpr, S_PAD: tl.constexpr, D: tl.constexpr, PDL: tl.constexpr):
        t = tl.program_id(0)
        h = tl.program_id(1)
        after_previous(PDL)
        sp = tl.arange(0, S_PAD)
        ok = sp < SPLITS
        flat = (sp * n_tokens + t) * n_heads + h
        m = tl.load(stat_ptr + flat, mask=ok, other=-1.0e30)
        total = tl.load(stat_ptr + SPLITS * n_tokens * n_heads + flat, mask=ok, other=0.0)
        w = tl.exp2(m - tl.max(m, 0))  # the maxima are of base-2 scores
        d = tl.arange(0, D)
        acc = tl.load(part_ptr + flat[:, None] * D + d[None, :], mask=ok[:, None], other=0.0)
        out = tl.sum(acc * w[:, None], 0) / tl.maximum(tl.sum(total * w, 0), 1e-30)
        tl.store(out_ptr + t * stride_ot + h * stride_oh + d, out.to(out_ptr.dtype.element_ty))


def _warps(rows: int, num_splits: int, decode_warps: int) -> int:
    """Warps of a tile of `rows` query rows. Decode tiles (16 rows: a GQA group of 4 padded) stream their keys
    fastest with one warp when each program takes a whole sequence (an H200, 256 sequences x 560 / 700 keys:
    145.0 / 174.5 us a layer, 4.1-4.2 TB/s, against 159.6 / 189.7 with 2 warps; bench/README.md); split
    launches (few sequences: batch 1) keep the 2 they were tuned with."""
    if rows <= 16:
        return decode_warps if num_splits == 1 else SPLIT_WARPS
    return 4 if rows <= 64 else 8


SPLIT_WARPS = 2


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start: torch.Tensor,
    tile_seq: torch.Tensor,
    tile_q: torch.Tensor,
    window: int | None,
    block_q: int,
    num_splits: int = 1,
    out: torch.Tensor | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int = 3,
    split_tokens: int | None = None,
    decode_warps: int = 1,
    kv_before_wait: bool = True,
) -> torch.Tensor:
    """Attention of the new tokens q [N, H, D] over the paged pool k/v [H_kv, num_blocks, block_size, D].

    Sequence s owns tokens query_start[s] .. query_start[s+1] - 1 of q (its last new tokens: the keys at
    positions 0 .. seq_lens[s] - 1 are in the pool, these included), and its block table row
    block_tables[s] (int32). tile_seq / tile_q (int32, from `query_tiles(..., block_q)`) list the programs.
    Writes and returns out [N, H, D] in q's dtype (rows no tile covers are left as they are).
    With num_splits > 1 the splits' partial results are merged by a second kernel; `split_tokens` then says
    that the tiles cover only the step's first split_tokens tokens (a mixed step's decodes, which come first:
    the partials and the merge skip its pre-fill tokens, whose own launch follows). (Merging them in the
    last split to finish, counted with an atomic add, saves that launch but made batch-1 decode slower on an
    H200: 249.4 -> 245.2 tok/s.) `decode_warps`, `kv_before_wait`: DecodeTuning's (kernels/tuning.py).
    """
    N, H, D = q.shape
    H_kv, _, block_size, _ = k_cache.shape
    G = H // H_kv
    g_pad = triton.next_power_of_2(G)
    if out is None:
        out = torch.empty_like(q)
    tiles = tile_seq.shape[0]
    if tiles == 0:
        return out
    block_n = block_n or (64 if block_q * g_pad >= 64 else 32)
    part = stats = out
    rows = N
    if num_splits > 1:
        rows = N if split_tokens is None else split_tokens
        part = torch.empty((num_splits, rows, H, D), dtype=torch.float32, device=q.device)
        stats = torch.empty((2, num_splits, rows, H), dtype=torch.float32, device=q.device)
    grid = (tiles, H_kv, num_splits)
    _paged_attention_kernel[grid](
        q, k_cache, v_cache, out, part, stats, block_tables, seq_lens, query_start, tile_seq, tile_q,
        D**-0.5, window or 0, rows, H,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        out.stride(0), out.stride(1),
        G=G, G_PAD=g_pad, BLOCK_Q=block_q, BLOCK_N=block_n, BLOCK_SIZE=block_size, D=D, SPLITS=num_splits,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",  # float32 stays exact (no TF32)
        V_EARLY=num_splits > 1,  # a split's one or two key blocks: no loop to pipeline their values
        KV_EARLY=num_splits > 1 and kv_before_wait,
        num_warps=num_warps or _warps(block_q * g_pad, num_splits, decode_warps), num_stages=num_stages,
        **pdl.options(q.device, N),
    )
    if num_splits > 1:
        _merge_kernel[(rows, H)](part, stats, out, rows, H, out.stride(0), out.stride(1), SPLITS=num_splits,
                              S_PAD=triton.next_power_of_2(num_splits), D=D, **pdl.options(q.device, N))
    return out


def reference_paged_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    seq_lens: torch.Tensor, query_start: torch.Tensor, window: int | None,
) -> torch.Tensor:
    """`paged_attention` in plain PyTorch, sequence by sequence (float32 softmax): the tests' oracle."""
    N, H, D = q.shape
    H_kv, _, block_size, _ = k_cache.shape
    out = torch.zeros_like(q)
    for s in range(seq_lens.shape[0]):
        lo, hi, length = int(query_start[s]), int(query_start[s + 1]), int(seq_lens[s])
        blocks = block_tables[s, : math.ceil(length / block_size)].long()
        keys = k_cache[:, blocks].reshape(H_kv, -1, D)[:, :length].float()
        values = v_cache[:, blocks].reshape(H_kv, -1, D)[:, :length].float()
        k_pos = torch.arange(length)
        q_pos = torch.arange(length - (hi - lo), length)
        allowed = k_pos[None] <= q_pos[:, None]
        if window:
            allowed &= q_pos[:, None] - k_pos[None] < window
        qs = q[lo:hi].float().transpose(0, 1)  # [H, n, D]
        keys = keys.repeat_interleave(H // H_kv, 0)
        values = values.repeat_interleave(H // H_kv, 0)
        scores = (qs @ keys.transpose(1, 2)) * D**-0.5
        scores = scores.masked_fill(~allowed.to(scores.device), float("-inf"))
        out[lo:hi] = (scores.softmax(-1) @ values).transpose(0, 1).to(q.dtype)
    return out
