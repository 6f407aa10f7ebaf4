"""What every paged attention backend shares: the step's positions and slots, and the calls the model makes.

A backend owns the metadata of a step (`build`, once per step, from the scheduled `Span`s) and reads the paged
pool (cache/paged.py) its own way. The model calls it per layer with this step's heads:
- `attend(layer, q, k, v, meta)`: q, k rotated (separate wq/wk/wv projections): store k, v; attend.
- `attend_heads(layer, qkv, freqs, meta)`: the fused wqkv's heads before RoPE, [1, N, H + 2 H_kv, D]. Backends
  that rotate and store in one kernel (`rotates`) do so; the others rotate as the model would and `attend`.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass

import torch

from mistral7b.cache.paged import PagedKVCache, Span, step_slots
from mistral7b.cache.upload import upload
from mistral7b.config import ModelArgs
from mistral7b.model.rope import apply_rotary, inv_frequencies


@dataclass
class StepMetadata:
    """What every layer of one paged step needs, whichever the backend."""

    positions: torch.Tensor  # [1, N]
    slot_mapping: torch.Tensor  # [N] flat slot of each new token


class PagedAttention:
    """The base of the backends: the pool, the model's shapes and the step's slots."""

    name = "base"
    scratch = False  # the pool needs a scratch block (CUDA graphs' padding rows)
    zeroes_blocks = True  # newly handed-out blocks must be zeroed (a masked key still multiplies its value)
    rotates = False  # attend_heads rotates q and k itself (the model passes freqs only for the others)

    def __init__(self, cache: PagedKVCache, args: ModelArgs):
        self.cache, self.args = cache, args
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.window, self.block_size, self.device = args.sliding_window, cache.block_size, cache.device
        self.inv_freq = inv_frequencies(args.head_dim, args.rope_theta, cache.device)

    def slots(self, decodes: Seq[Span], prefills: Seq[Span]) -> tuple[torch.Tensor, torch.Tensor]:
        """(positions [1, N], slot_mapping [N]) on the device."""
        positions, slots = step_slots(decodes, prefills, self.block_size)
        return upload(positions[None], self.device, torch.long), upload(slots, self.device, torch.long)

    def zero_blocks(self, blocks: Seq[int]) -> None:
        """Zero newly handed-out blocks where this backend reads slots its mask drops (a NaN left there would
        spread). The kernels load no slot at or past a row's length, and before it only written slots or the
        null block, so they skip it: 2 launches a layer every step that starts a block (1% of a 256-sequence
        decode step of a 7B model on an H200)."""
        if self.zeroes_blocks:
            self.cache.zero_blocks(blocks)

    def build(self, decodes: Seq[Span], prefills: Seq[Span]) -> StepMetadata:
        raise NotImplementedError

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               meta: StepMetadata) -> torch.Tensor:
        raise NotImplementedError

    def attend_heads(self, layer: int, qkv: torch.Tensor, freqs: torch.Tensor | None,
                     meta: StepMetadata) -> torch.Tensor:
        """Attention for the fused projection's heads qkv [1, N, H + 2 H_kv, D] before RoPE -> [1, N, H, D]."""
        n_qk = self.n_heads + self.n_kv_heads
        q, k = apply_rotary(qkv[:, :, :n_qk], freqs).split([self.n_heads, self.n_kv_heads], dim=2)
        return self.attend(layer, q, k, qkv[:, :, n_qk:], meta)
