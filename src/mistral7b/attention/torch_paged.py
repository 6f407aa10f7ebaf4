"""Paged attention in PyTorch ops: gathers and matmuls / SDPA (the CPU's path, and any device's reference).

Each layer stores the step's keys/values at their slots, then attends group by group: all decode rows in one
call, each pre-fill chunk in its own. A group gathers the live blocks of its rows (at most about W / B + 2 with a
window) and masks them by absolute position with the one window rule (model/attention.py), so a sequence
attends to exactly what it would attend to alone.

Worked example, B = 4, W = 6, one sequence at its decode step for position 9 (tokens 0..8 computed): its first
live logical block is 1 (block 0 was released); gathered logical blocks 1, 2 = positions 4..11; valid keys are
< 10 (positions 10, 11 are not written yet) and >= 4 by the window rule: keys 4..9, W = 6 keys.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from mistral7b.attention.base import PagedAttention, StepMetadata
from mistral7b.cache.paged import Span
from mistral7b.cache.upload import upload
from mistral7b.model.attention import window_mask


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
    native: object | None = None  # decode rows for the CPU extension instead (attention/cpu_native.py)


@dataclass
class GroupMetadata(StepMetadata):
    groups: list[AttentionGroup] = field(default_factory=list)


class TorchAttention(PagedAttention):
    name = "torch"

    def build(self, decodes: Seq[Span], prefills: Seq[Span]) -> GroupMetadata:
        """Metadata for a step whose flat tokens are the decode spans (n = 1) in order, then each pre-fill."""
        positions, slots = self.slots(decodes, prefills)
        groups = [self._decode_group(decodes)] if decodes else []
        offset = len(decodes)
        for span in prefills:
            groups.append(self._group(offset, [span]))
            offset += span.n
        return GroupMetadata(positions, slots, groups)

    def _decode_group(self, spans: Seq[Span]) -> AttentionGroup:
        return self._group(0, spans)

    def _group(self, start: int, spans: Seq[Span]) -> AttentionGroup:
        bs = self.block_size
        queries = spans[0].n
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
            heads = torch.arange(self.n_kv_heads)[:, None] * self.cache.num_blocks
            block_ids = upload((heads + torch.tensor(ids)[None]).flatten(), self.device)
        return AttentionGroup(start=start, end=start + len(spans) * queries, rows=len(spans), queries=queries,
                              block_ids=block_ids, block_range=block_range, mask=mask, bias=bias)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               meta: GroupMetadata) -> torch.Tensor:
        """Write this step's k/v [1, N, H_kv, D] to their slots; attend each group; return [1, N, H, D]."""
        self.cache.store(layer, k, v, meta.slot_mapping)
        return self.attend_stored(layer, q, meta)

    def attend_stored(self, layer: int, q: torch.Tensor, meta: GroupMetadata) -> torch.Tensor:
        """Attention of q [1, N, H, D] over the pool, this step's keys and values already stored."""
        outs = [self._attend_group(layer, q[0, g.start : g.end], g) for g in meta.groups]
        return (outs[0] if len(outs) == 1 else torch.cat(outs)).unsqueeze(0)

    def _attend_group(self, layer: int, queries: torch.Tensor, g: AttentionGroup) -> torch.Tensor:
        """One group's queries [rows * queries, H, D] -> [rows * queries, H, D]."""
        cache_k, cache_v = self.cache.k[layer], self.cache.v[layer]
        H_kv, D = self.n_kv_heads, self.head_dim
        if g.block_range is not None:  # [H_kv, 1, keys, D]: one plain copy per head (batched matmuls over
            lo, hi = g.block_range  # a strided view would make that copy anyway, and more slowly)
            keys = cache_k[:, lo:hi].reshape(H_kv, 1, -1, D).contiguous()
            values = cache_v[:, lo:hi].reshape(H_kv, 1, -1, D).contiguous()
        else:  # [H_kv, rows, keys, D]
            pool = (H_kv * self.cache.num_blocks, self.block_size, D)
            keys = cache_k.view(pool).index_select(0, g.block_ids).view(H_kv, g.rows, -1, D)
            values = cache_v.view(pool).index_select(0, g.block_ids).view(H_kv, g.rows, -1, D)
        if g.bias is not None:
            return one_query_attention(queries, keys, values, g.bias)
        n_heads = queries.shape[1]
        qg = queries.reshape(g.rows, g.queries, n_heads, D).transpose(1, 2)
        out = F.scaled_dot_product_attention(qg, keys.transpose(0, 1), values.transpose(0, 1), attn_mask=g.mask,
                                             enable_gqa=n_heads != H_kv)
        return out.transpose(1, 2).reshape(g.end - g.start, n_heads, D)


def one_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
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
