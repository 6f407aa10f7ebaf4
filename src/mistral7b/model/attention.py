"""Attention metadata and the one sliding-window rule every path uses.

The rule (paper figures, reference masks, Hugging Face): the query at absolute position i attends to the keys
at positions i-W+1 .. i, itself included; with no window (a Llama, Mistral v0.2+) it attends to 0 .. i.
Masks are built from the absolute positions of queries and keys, never from slot order, so a rolling buffer
(slot = position mod W) needs no un-rotation and a chunk of any size sees exactly its window.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def window_mask(
    q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None, segment_ids: torch.Tensor | None = None
) -> torch.Tensor:
    """Boolean mask [B, 1, Tq, Tk], True where query q may attend key k.

    q_pos [B, Tq] and k_pos [B, Tk] hold absolute positions; -1 marks padding (empty cache slots, pad tokens).
    A padding query gets an all-True row so attention stays finite; its output is never used.
    segment_ids [B, T] (queries = keys, no cache) keeps packed examples from attending to each other.
    """
    q = q_pos.unsqueeze(-1)
    k = k_pos.unsqueeze(-2)
    allowed = (k >= 0) & (k <= q)
    if window is not None:
        allowed &= q - k < window
    if segment_ids is not None:
        allowed &= segment_ids.unsqueeze(-1) == segment_ids.unsqueeze(-2)
    allowed |= q < 0
    return allowed.unsqueeze(1)


@dataclass
class CacheWrite:
    """Where a step's new keys/values go, as flat indices: new token rows[n] (= batch * T + token) is stored in
    cache slot slots[n] (= batch * capacity + slot), so a layer writes with one index_select and one index_copy_.
    """

    rows: torch.Tensor
    slots: torch.Tensor


@dataclass
class AttentionMetadata:
    """What every layer of one forward step needs to attend; built once per step and passed explicitly.

    positions: [B, T] absolute positions of the step's tokens (-1 = padding).
    mask: [B, 1, T, K] where K = number of keys the layers see (cache slots, plus the new tokens when
        `concat_new` is set).
    write: the cache writes of this step, or None without a cache.
    concat_new: keys = cache contents (before this step's writes) followed by the new tokens. Needed when a
        chunk would overwrite ring slots its own early queries still attend to; otherwise the new tokens are
        written first and the layers attend over the cache alone.
    """

    positions: torch.Tensor
    mask: torch.Tensor | None
    write: CacheWrite | None = None
    concat_new: bool = True
    segments: list[Segment] | None = None  # packed rows without a cache: each example attends alone

    @classmethod
    def without_cache(
        cls, positions: torch.Tensor, window: int | None, segment_ids: torch.Tensor | None = None
    ) -> AttentionMetadata:
        """A full pass over the given tokens: causal within the window (and segment), nothing cached. Packed
        rows (segment_ids) attend example by example: the same attention as the rows' block-diagonal mask at
        the cost of the examples' own lengths (a row of 20 short chats: 786 x 786 -> 20 x ~40 x 40)."""
        if segment_ids is None:
            return cls(positions=positions, mask=window_mask(positions, positions, window))
        segments = []
        for row, ids in enumerate(segment_ids.tolist()):
            start = 0
            for t in range(1, len(ids) + 1):
                if t == len(ids) or ids[t] != ids[start]:
                    if ids[start] >= 0:  # padding (-1) attends to nothing that is used
                        pos = positions[row, start:t]
                        segments.append(Segment(row, start, t, window_mask(pos[None], pos[None], window)))
                    start = t
        return cls(positions=positions, mask=None, segments=segments)


@dataclass
class Segment:
    """One example of a packed row: tokens [start, stop) of row `row`, and its own mask [1, 1, n, n]."""

    row: int
    start: int
    stop: int
    mask: torch.Tensor


def attend_without_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
    """Attention of a pass with no cache: under meta.mask, or example by example (meta.segments; padding
    positions get zeros, which nothing reads)."""
    if meta.segments is None:
        return dense_attention(q, k, v, meta.mask)
    out = q.new_zeros(q.shape)
    for s in meta.segments:
        out[s.row : s.row + 1, s.start : s.stop] = dense_attention(
            q[s.row : s.row + 1, s.start : s.stop], k[s.row : s.row + 1, s.start : s.stop],
            v[s.row : s.row + 1, s.start : s.stop], s.mask)
    return out


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Attention of q [B, T, H, D] over k, v [B, K, H_kv, D] (GQA: H a multiple of H_kv) under a boolean
    mask [B, 1, T, K]; returns [B, T, H, D]."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                         enable_gqa=q.shape[2] != k.shape[2])
    return out.transpose(1, 2)
