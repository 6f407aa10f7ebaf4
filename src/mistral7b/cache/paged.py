"""The paged KV cache: per layer, a pool of blocks [n_kv_heads, num_blocks, block_size, head_dim] for keys and
for values, shared by every sequence through its block table (cache/block_manager.py decides who holds what).
Heads come first so that gathering the blocks of S sequences gives [n_kv_heads, S, keys, head_dim], which the
attention matmuls read as it is (no transposed copy of the keys each layer).

One engine step computes a flat list of tokens from many sequences ([1, N]: decodes first, then pre-fill
chunks). Each layer writes the step's keys/values to their slots (`slot_mapping`, slot = block * B + offset),
then attends group by group: all decode rows in one call, each pre-fill chunk in its own. A group gathers the
live blocks of its rows (at most about W / B + 2 with a window) and masks them by absolute position with the
one window rule (model/attention.py), so a sequence attends to exactly what it would attend to alone. Where the
CPU extension is built (mistral7b/cpu), decode rows are not gathered: it reads the blocks in place, for float32
pools in float32 and for bf16 pools (AVX-512 builds) rounding exactly as the gathers and matmuls do.

On a GPU (or with attention="triton") the same step is planned for the Triton kernel instead
(kernels/paged_attention.py): block tables, key counts and query offsets per sequence, one launch for the
decode rows (keys split over programs when few sequences run) and one for the pre-fill tiles; the kernel reads
the pool in place, so nothing is gathered. A scratch block after the pool takes CUDA graphs' padding rows.

Worked example, B = 4, W = 6, one sequence at its decode step for position 9 (tokens 0..8 computed):
    first needed position 9 - 6 + 1 = 4 -> first live logical block 1 (block 0 was released);
    gathered logical blocks 1, 2 = positions 4..11; valid keys are < 10 (positions 10, 11 are not
    written yet) and >= 4 by the window rule: keys 4..9, i.e. W = 6 keys, itself included.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mistral7b.cache.upload import upload
from mistral7b.config import ModelArgs
from mistral7b import kernels
from mistral7b.kernels.tuning import DecodeTuning
from mistral7b.model.attention import window_mask
from mistral7b.model.rope import inv_frequencies

DECODE_ROWS = 16  # rows of the kernel's matrix product for decode tiles: queries x padded group heads
PREFILL_ROWS = 64  # 16 queries x 4 heads for Mistral: the fastest of a sweep on an H200 (bench/README.md)
# A split takes at least 32 keys (with a limit of 1,280 tokens: 32 splits, not 20 of 64 keys: 259.2 -> 263.2;
# the most splits a sequence takes is DecodeTuning.max_splits).
MIN_SPLIT_KEYS = 32


@dataclass
class AttentionGroup:
    """One attention call: `rows` sequences with `queries` new tokens each, flat tokens start .. end."""

    start: int
    end: int
    rows: int
    queries: int
    block_ids: torch.Tensor | None  # [H_kv * rows * blocks] (head, block) rows of the flat pool to gather,
    # padded with the null block: one index_select over the leading dimension copies whole blocks (3x faster
    # on a CPU than gathering along the block dimension)
    block_range: tuple[int, int] | None  # instead of block_ids: one row whose blocks lie in order, lo .. hi - 1,
    # copied as one slice (a lone sequence gets its blocks in order from the pool)
    mask: torch.Tensor | None  # [rows, 1, queries, blocks * block_size]
    bias: torch.Tensor | None = None  # decode rows on a CPU: the mask as 0 / -inf [rows, keys], float32
    native: NativeDecode | None = None  # decode rows for the CPU extension instead (no gather, no mask)


@dataclass
class NativeDecode:
    """Decode rows for the CPU extension's attention (mistral7b/cpu/attention.cpp), which reads the pool in
    place."""

    block_tables: torch.Tensor  # [rows, longest] int32, 0-padded
    first_blocks: torch.Tensor  # [rows] int32: each row's first live logical block
    seq_lens: torch.Tensor  # [rows] int32: keys after this step, the query's own included


def block_tables(spans: Seq[Span]) -> torch.Tensor:
    """The spans' block tables as one int32 [S, longest] tensor, zero-padded (filled row by row through numpy:
    twice as fast as torch.tensor on nested lists)."""
    table = np.zeros((len(spans), max(len(s.block_table) for s in spans)), dtype=np.int32)
    for i, s in enumerate(spans):
        table[i, : len(s.block_table)] = s.block_table
    return torch.from_numpy(table)


@dataclass
class KernelLaunch:
    """One launch of the paged-attention kernel: its tiles (sequence, first query) and their shape."""

    tile_seq: torch.Tensor  # [tiles] int32
    tile_q: torch.Tensor  # [tiles] int32
    block_q: int
    num_splits: int = 1
    tokens: int | None = None  # with splits: the launch covers the step's first `tokens` tokens (its decodes)


@dataclass
class KernelMetadata:
    """The step's sequences for the GPU kernel (kernels/paged_attention.py), decodes first."""

    block_tables: torch.Tensor  # [S, max blocks] int32, 0-padded
    seq_lens: torch.Tensor  # [S] int32: keys of each sequence after this step
    query_start: torch.Tensor  # [S + 1] int32: where each sequence's new tokens start in the flat step
    launches: list[KernelLaunch]


@dataclass
class PagedMetadata:
    """What every layer of one paged step needs; built once per step by `PagedKVCache.plan`."""

    positions: torch.Tensor  # [1, N]
    slot_mapping: torch.Tensor  # [N] flat slot of each new token
    groups: list[AttentionGroup]  # the PyTorch path (CPU)
    kernel: KernelMetadata | None = None  # the kernel path (GPU, or Triton's interpreter)


@dataclass
class Span:
    """What the cache needs to know of one scheduled sequence: it computes positions start .. start + n - 1."""

    start: int
    n: int
    block_table: list[int]
    first_live_block: int


def decode_slots(spans: Seq[Span], block_size: int) -> list[int]:
    """The cache slot (block * block_size + offset) of each decode span's one position."""
    return [s.block_table[s.start // block_size] * block_size + s.start % block_size for s in spans]


class PagedKVCache:
    def __init__(self, args: ModelArgs, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu", attention: str = "auto", tuning: DecodeTuning | None = None):
        """`num_blocks` physical blocks including the null block 0. Memory is reserved, not touched: a block is
        zeroed when it is handed out, so resident memory follows what is used.

        `attention`: "torch" (gathers + matmuls/SDPA), "triton" (the paged kernel; on a CPU only under
        TRITON_INTERPRET=1, for tests), or "auto": the kernel on CUDA when Triton is installed. The kernel path
        adds one scratch block after the pool, which padded rows of a CUDA graph write to. `tuning`: how the
        kernel path launches (key splits, warps, RoPE in wqkv's GEMV; kernels/tuning.py).
        """
        self.tuning = tuning or DecodeTuning()
        self.window, self.block_size = args.sliding_window, block_size
        self.n_kv_heads, self.head_dim, self.n_heads = args.n_kv_heads, args.head_dim, args.n_heads
        self.dtype, self.device = dtype, torch.device(device)
        if attention not in ("auto", "torch", "triton"):
            raise ValueError(f"attention must be auto, torch or triton, got {attention!r}")
        if attention == "triton" and not kernels.available():
            raise ValueError("attention='triton' needs the triton package")
        self.use_kernel = attention == "triton" or (attention == "auto" and self.device.type == "cuda"
                                                    and kernels.available())
        self.native = None  # the CPU extension's decode attention and rotary store (mistral7b/cpu)
        if attention == "auto" and self.device.type == "cpu" and self._native_shapes(args, block_size, dtype):
            from mistral7b import cpu

            ops = cpu.load()
            if ops is not None and (dtype == torch.float32 or ops.EXACT_BF16_ATTENTION):
                self.native = ops
        if self.use_kernel:  # imported here: Triton's import is slow and the CPU path never needs it
            from mistral7b.kernels import gemv, paged_attention
            from mistral7b.kernels.rotary_store import rotary_store

            self._kernels, self._gemv, self._rotary_store = paged_attention, gemv, rotary_store
        self.num_blocks = num_blocks
        self.scratch_block = num_blocks if self.use_kernel else None
        self.inv_freq = inv_frequencies(args.head_dim, args.rope_theta, self.device)
        group_pad = 1 << (args.n_heads // args.n_kv_heads - 1).bit_length()
        self.decode_block_q = max(1, DECODE_ROWS // group_pad)
        self.prefill_block_q = max(1, PREFILL_ROWS // group_pad)
        sms = torch.cuda.get_device_properties(self.device).multi_processor_count if self.device.type == "cuda" else 4
        self.target_programs = 2 * sms
        physical = num_blocks + (1 if self.use_kernel else 0)
        shape = (args.n_kv_heads, physical, block_size, args.head_dim)
        self.k = [torch.empty(shape, dtype=dtype, device=self.device) for _ in range(args.n_layers)]
        self.v = [torch.empty(shape, dtype=dtype, device=self.device) for _ in range(args.n_layers)]
        self._zero([0])  # the null block: tables pad with it, and keys the mask drops still meet their values

    @staticmethod
    def _native_shapes(args: ModelArgs, block_size: int, dtype: torch.dtype) -> bool:
        """Shapes the extension's decode attention takes: float32 pools with a head_dim of whole vectors; bf16
        ones where its sums follow oneDNN's (keys paired from the row's first block, head_dim 64 or 128 with up
        to 8 query heads a kv head), as it must to give the PyTorch path's bits."""
        if dtype == torch.float32:
            return args.head_dim % 16 == 0 and args.head_dim <= 256
        return (dtype == torch.bfloat16 and block_size % 2 == 0 and args.head_dim % 64 == 0
                and args.n_heads // args.n_kv_heads <= 8)

    @staticmethod
    def block_bytes(args: ModelArgs, block_size: int, dtype: torch.dtype) -> int:
        """Bytes of one block over all layers, keys and values."""
        itemsize = torch.empty(0, dtype=dtype).element_size()
        return 2 * args.n_layers * block_size * args.n_kv_heads * args.head_dim * itemsize

    def zero_blocks(self, blocks: Seq[int]) -> None:
        """Zero newly handed-out blocks, for the PyTorch attention (keys its mask drops still multiply their
        values: a NaN left in a slot would spread). The kernels load no slot at or past a row's length, and
        before it only written slots or the null block, so on their path this is skipped: 2 launches a layer
        every step that starts a block (1% of a 256-sequence decode step of a 7B model on an H200)."""
        if not self.use_kernel:
            self._zero(blocks)

    def _zero(self, blocks: Seq[int]) -> None:
        if not blocks:
            return
        idx = upload(list(blocks), self.device, torch.long)
        for t in self.k + self.v:
            t.index_fill_(1, idx, 0)

    def decode_splits(self, rows: int, max_keys: int) -> int:
        """Key splits per decode sequence so that rows x KV heads x splits programs about fill the GPU."""
        if max_keys <= 0:
            return 1
        want = -(-self.target_programs // max(1, rows * self.n_kv_heads))
        return max(1, min(self.tuning.max_splits, want, -(-max_keys // MIN_SPLIT_KEYS)))

    def plan(self, decodes: Seq[Span], prefills: Seq[Span]) -> PagedMetadata:
        """Metadata for a step whose flat tokens are the decode spans (n = 1) in order, then each pre-fill."""
        bs = self.block_size
        # One entry per decode, then whole pre-fill chunks through numpy (a Python loop over 8K pre-fill tokens
        # took ~2 ms a step, with the GPU waiting).
        positions = [np.array([s.start for s in decodes], dtype=np.int64)]
        slots = [np.array(decode_slots(decodes, bs), dtype=np.int64)]
        for span in prefills:
            pos = np.arange(span.start, span.start + span.n, dtype=np.int64)
            positions.append(pos)
            slots.append(np.asarray(span.block_table, dtype=np.int64)[pos // bs] * bs + pos % bs)
        dev = self.device
        positions_t = upload(np.concatenate(positions)[None], dev, torch.long)
        slots_t = upload(np.concatenate(slots), dev, torch.long)
        if self.use_kernel:
            return PagedMetadata(positions=positions_t, slot_mapping=slots_t, groups=[],
                                 kernel=self._kernel_metadata(decodes, prefills))
        groups = []
        if decodes:
            groups.append(self._group(0, decodes))
        offset = len(decodes)
        for span in prefills:
            groups.append(self._group(offset, [span]))
            offset += span.n
        return PagedMetadata(positions=positions_t, slot_mapping=slots_t, groups=groups)

    def _kernel_metadata(self, decodes: Seq[Span], prefills: Seq[Span]) -> KernelMetadata:
        spans = [*decodes, *prefills]
        tables = block_tables(spans)
        lens = [s.n for s in spans]
        starts = [0]
        for n in lens:
            starts.append(starts[-1] + n)
        dev, i32 = self.device, torch.int32
        launches = []
        if decodes:
            window = self.window or 1 << 62
            keys = max(min(s.start + 1, window) for s in decodes)
            launches.append(KernelLaunch(torch.arange(len(decodes), dtype=i32, device=dev),
                                         torch.zeros(len(decodes), dtype=i32, device=dev),
                                         self.decode_block_q, self.decode_splits(len(decodes), keys), len(decodes)))
        if prefills:
            seqs, firsts = self._kernels.query_tiles([0] * len(decodes) + [s.n for s in prefills], self.prefill_block_q)
            launches.append(KernelLaunch(upload(seqs, dev, i32), upload(firsts, dev, i32), self.prefill_block_q))
        return KernelMetadata(block_tables=upload(tables, dev), seq_lens=upload([s.start + s.n for s in spans], dev,
                              i32), query_start=upload(starts, dev, i32), launches=launches)

    def _group(self, start: int, spans: Seq[Span]) -> AttentionGroup:
        bs = self.block_size
        queries = spans[0].n
        if queries == 1 and self.native is not None:
            i32 = torch.int32
            native = NativeDecode(block_tables(spans), torch.tensor([s.first_live_block for s in spans], dtype=i32),
                                  torch.tensor([s.start + 1 for s in spans], dtype=i32))
            return AttentionGroup(start=start, end=start + len(spans), rows=len(spans), queries=1, block_ids=None,
                                  block_range=None, mask=None, native=native)
        # A row's first gathered block is the first one its earliest query may attend to: the block manager has
        # released every block before it (allocate / match_prefix), so that is the row's first live block.
        firsts = [s.first_live_block for s in spans]
        lasts = [(s.start + s.n - 1) // bs for s in spans]
        width = max(hi - lo + 1 for lo, hi in zip(firsts, lasts))
        ids = []
        for s, lo, hi in zip(spans, firsts, lasts):
            ids.extend(s.block_table[lo : hi + 1])
            ids.extend([0] * (width - (hi - lo + 1)))
        k_pos = torch.tensor(firsts)[:, None] * bs + torch.arange(width * bs)[None]
        ends = torch.tensor([s.start + s.n for s in spans])[:, None]
        k_pos = k_pos.masked_fill(k_pos >= ends, -1)  # padding, and slots not written yet
        q_pos = torch.tensor([s.start for s in spans])[:, None] + torch.arange(queries)[None]
        mask = upload(window_mask(q_pos, k_pos, self.window), self.device)
        bias = None
        if queries == 1 and self.device.type == "cpu":
            bias = torch.zeros(len(spans), mask.shape[-1], dtype=torch.float32, device=self.device)
            bias.masked_fill_(~mask.view(len(spans), -1), float("-inf"))
        block_ids, block_range = None, None
        if len(spans) == 1 and ids == list(range(ids[0], ids[0] + len(ids))):
            block_range = (ids[0], ids[0] + len(ids))
        else:
            heads = torch.arange(self.n_kv_heads)[:, None] * self.num_blocks
            block_ids = upload((heads + torch.tensor(ids)[None]).flatten(), self.device)
        return AttentionGroup(start=start, end=start + len(spans) * queries, rows=len(spans), queries=queries,
                              block_ids=block_ids, block_range=block_range, mask=mask, bias=bias)

    def attend_qkv(self, layer: int, wqkv: nn.Module, x: torch.Tensor, meta: PagedMetadata,
                   norm: tuple[torch.Tensor, float] | None = None) -> torch.Tensor:
        """The kernel path from the fused projection: x [1, N, dim] through wqkv, rotate q and k, store k/v,
        attend; returns [1, N, H, D]. A lone token does the first three in wqkv's GEMV kernel, and with `norm`
        (kernels/gemv.gemv's) x is the residual stream, normalised there too."""
        assert meta.kernel is not None
        gemv = self._gemv
        if self.tuning.rope_in_gemv and gemv.takes_kernel(wqkv, x):
            rotary = gemv.Rotary(meta.positions[0], meta.slot_mapping, self.inv_freq, self.k[layer], self.v[layer],
                                 self.n_heads)
            q = gemv.gemv(x, wqkv.weight, rotary=rotary, norm=norm).view(-1)[: self.n_heads * self.head_dim]
            q = q.view(1, self.n_heads, self.head_dim)
        else:
            assert norm is None, "the norm is folded into the GEMV only"
            q = self._rotary_store(gemv.project(wqkv, x)[0], meta.positions[0], self.inv_freq, meta.slot_mapping,
                                   self.k[layer], self.v[layer], self.n_heads)
        return self._kernel_attend(layer, q, meta.kernel).unsqueeze(0)

    def _kernel_attend(self, layer: int, q: torch.Tensor, km: KernelMetadata) -> torch.Tensor:
        out = torch.empty_like(q)
        for launch in km.launches:
            self._kernels.paged_attention(q, self.k[layer], self.v[layer], km.block_tables, km.seq_lens, km.query_start,
                                   launch.tile_seq, launch.tile_q, self.window, launch.block_q, launch.num_splits,
                                   out=out, split_tokens=launch.tokens, decode_warps=self.tuning.decode_warps,
                                   kv_before_wait=self.tuning.kv_before_wait)
        return out

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               meta: PagedMetadata) -> torch.Tensor:
        """Write this step's k/v [1, N, H_kv, D] to their slots; attend each group; return [1, N, H, D]."""
        H_kv, D = self.n_kv_heads, self.head_dim
        self.k[layer].view(H_kv, -1, D).index_copy_(1, meta.slot_mapping, k[0].transpose(0, 1).to(self.dtype))
        self.v[layer].view(H_kv, -1, D).index_copy_(1, meta.slot_mapping, v[0].transpose(0, 1).to(self.dtype))
        return self._attend_stored(layer, q, meta)

    def attend_rotary(self, layer: int, qkv: torch.Tensor, freqs: torch.Tensor, meta: PagedMetadata) -> torch.Tensor:
        """`attend` for the fused projection's heads qkv [1, N, H + 2 H_kv, D] before RoPE, on a CPU with the
        extension (`self.native`): one call rotates q and k (apply_rotary's bits) and stores k and v,
        where apply_rotary, the split and two index copies dispatch ~20 ops."""
        q = self.native.rotate_store(qkv[0].contiguous(), torch.view_as_real(freqs).reshape(qkv.shape[1], -1, 2),
                                     self.k[layer], self.v[layer], meta.slot_mapping, self.n_heads)
        return self._attend_stored(layer, q.unsqueeze(0), meta)

    def _attend_stored(self, layer: int, q: torch.Tensor, meta: PagedMetadata) -> torch.Tensor:
        """Attention of q [1, N, H, D] over the cache, this step's keys and values already stored."""
        cache_k, cache_v = self.k[layer], self.v[layer]
        H_kv, D = self.n_kv_heads, self.head_dim
        if meta.kernel is not None:
            return self._kernel_attend(layer, q[0].to(self.dtype), meta.kernel).to(q.dtype).unsqueeze(0)
        n_heads = q.shape[2]
        pool = (H_kv * self.num_blocks, self.block_size, D)
        outs = []
        for g in meta.groups:
            if g.native is not None:  # reads the pool in place; the same bits as the gathers + bmm below
                n = g.native
                outs.append(self.native.decode_attention(q[0, g.start : g.end], cache_k, cache_v, n.block_tables,
                                                         n.first_blocks, n.seq_lens, self.window or 0, D**-0.5))
                continue
            if g.block_range is not None:  # [H_kv, 1, keys, D]: one plain copy per head (batched matmuls over
                lo, hi = g.block_range  # a strided view would make that copy anyway, and more slowly)
                keys = cache_k[:, lo:hi].reshape(H_kv, 1, -1, D).contiguous()
                values = cache_v[:, lo:hi].reshape(H_kv, 1, -1, D).contiguous()
            else:  # [H_kv, rows, keys, D]
                keys = cache_k.view(pool).index_select(0, g.block_ids).view(H_kv, g.rows, -1, D)
                values = cache_v.view(pool).index_select(0, g.block_ids).view(H_kv, g.rows, -1, D)
            queries = q[0, g.start : g.end]  # [rows * queries, H, D]
            if g.bias is not None:
                out = _one_query_attention(queries, keys, values, g.bias)
            else:
                qg = queries.reshape(g.rows, g.queries, n_heads, D).transpose(1, 2)
                out = F.scaled_dot_product_attention(qg, keys.transpose(0, 1), values.transpose(0, 1),
                                                     attn_mask=g.mask, enable_gqa=n_heads != H_kv)
                out = out.transpose(1, 2).reshape(g.end - g.start, n_heads, D)
            outs.append(out)
        return (outs[0] if len(outs) == 1 else torch.cat(outs)).unsqueeze(0)


def _one_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Attention of one query per row, q [S, H, D] over k, v [H_kv, S, K, D], with an additive mask bias
    [S, K]; returns [S, H, D]. Two batched matmuls and a float32 softmax: on a CPU 3 to 15 times faster than
    scaled_dot_product_attention, whose flash kernel is built for many queries (bench/README.md).

    The matmuls are torch.bmm over (kv head, row) on exactly the operands torch.matmul would fold the 4-d
    shapes into, without its broadcasting glue (a few us a call, 60 calls a decoded token), so the results
    are bit for bit the same; the scaling and the mask are applied in place."""
    S, H, D = q.shape
    H_kv, K = k.shape[0], k.shape[2]
    G = H // H_kv  # query head h reads kv head h // G
    grouped = q.view(S, H_kv, G, D).transpose(0, 1).reshape(H_kv * S, G, D)
    scores = torch.bmm(grouped, k.view(H_kv * S, K, D).transpose(1, 2)).float()
    scores.view(H_kv, S, G, K).mul_(D**-0.5).add_(bias.view(1, S, 1, K))
    out = torch.bmm(scores.softmax(-1).to(v.dtype), v.view(H_kv * S, K, D))  # [H_kv * S, G, D]
    return out.view(H_kv, S, G, D).transpose(0, 1).reshape(S, H, D)
