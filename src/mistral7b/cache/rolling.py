"""The paper's rolling-buffer KV cache, for a static batch of sequences.

Keys (already rotated by RoPE at their absolute position) and values of position p go to slot p mod W, so a
sequence never holds more than W slots per layer; with no window the cache grows as the sequence does.
Capacity grows lazily up to min(W, tokens seen), so short prompts do not pay for a full window.

Worked example, W = 4, one sequence, prompt of 6 tokens pre-filled in chunks of 3, then one decode step:
    chunk 1: positions 0 1 2    -> slots 0 1 2           (nothing overwritten: write first, attend the cache)
    chunk 2: positions 3 4 5    -> slots 3 0 1           (position 4 overwrites position 0, which query 3
                                                          still needs: attend old cache + the chunk, then
                                                          write)
    decode:  position 6         -> slot 2                (overwrites position 2, outside 6's window 3..6)
Every mask comes from the absolute positions stored beside the slots (`slot_pos`), never from slot order.
"""

from __future__ import annotations

import torch

from mistral7b.config import ModelArgs
from mistral7b.model.attention import AttentionMetadata, CacheWrite, dense_attention, window_mask


class RollingKVCache:
    def __init__(self, args: ModelArgs, batch_size: int, dtype: torch.dtype, device: torch.device | str = "cpu"):
        self.window = args.sliding_window
        self.n_layers = args.n_layers
        self.batch_size = batch_size
        self._kv_shape = (args.n_kv_heads, args.head_dim)
        self.dtype, self.device = dtype, torch.device(device)
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.slot_pos = torch.full((batch_size, 0), -1, dtype=torch.long, device=self.device)
        self._allocate(0)

    @property
    def capacity(self) -> int:
        return self.slot_pos.shape[1]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def reserve(self, n_positions: int) -> None:
        """Make room for positions 0 .. n_positions-1 (capped at W), so decode never reallocates."""
        need = n_positions if self.window is None else min(self.window, n_positions)
        if need > self.capacity:
            self._allocate(need)

    def _allocate(self, capacity: int) -> None:
        old = self.capacity
        shape = (self.batch_size, capacity, *self._kv_shape)
        grown_k, grown_v = [], []
        for i in range(self.n_layers):
            k = torch.zeros(shape, dtype=self.dtype, device=self.device)
            v = torch.zeros(shape, dtype=self.dtype, device=self.device)
            if old:
                k[:, :old] = self.k[i]
                v[:, :old] = self.v[i]
            grown_k.append(k)
            grown_v.append(v)
        self.k, self.v = grown_k, grown_v
        slot_pos = torch.full((self.batch_size, capacity), -1, dtype=torch.long, device=self.device)
        slot_pos[:, :old] = self.slot_pos
        self.slot_pos = slot_pos

    def prepare(self, positions: torch.Tensor) -> AttentionMetadata:
        """Plan one step for new tokens at `positions` [B, T] (-1 = padding); records their slots."""
        positions = positions.to(self.device)
        valid = positions >= 0
        last = positions.max(dim=1).values
        if valid.any():
            self.reserve(int(last.max()) + 1)
        slot = positions % self.window if self.window is not None else positions.clone()
        # Of a chunk longer than W only the last W positions of each row stay in the ring.
        keep = valid if self.window is None else valid & (positions > (last - self.window).unsqueeze(1))
        batch_idx, token_idx = keep.nonzero(as_tuple=True)
        write = CacheWrite(rows=batch_idx * positions.shape[1] + token_idx,
                           slots=batch_idx * self.capacity + slot[batch_idx, token_idx])

        wraps = self.window is not None and int(last.max()) >= self.window
        concat_new = positions.shape[1] > 1 and wraps
        k_pos = torch.cat([self.slot_pos, positions], dim=1) if concat_new else self.slot_pos
        self.slot_pos.view(-1).index_copy_(0, write.slots, positions.reshape(-1).index_select(0, write.rows))
        mask = window_mask(positions, k_pos, self.window)
        return AttentionMetadata(positions=positions, mask=mask, write=write, concat_new=concat_new)

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this layer's new k/v [B, T, H_kv, D]; return the keys/values the step attends to."""
        cache_k, cache_v = self.k[layer], self.v[layer]
        w = meta.write
        if meta.concat_new:
            keys, values = torch.cat([cache_k, k.to(self.dtype)], 1), torch.cat([cache_v, v.to(self.dtype)], 1)
        if w is not None:
            flat = (-1, *self._kv_shape)
            cache_k.view(flat).index_copy_(0, w.slots, k.reshape(flat).index_select(0, w.rows).to(self.dtype))
            cache_v.view(flat).index_copy_(0, w.slots, v.reshape(flat).index_select(0, w.rows).to(self.dtype))
        if meta.concat_new:
            return keys, values
        return cache_k, cache_v

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               meta: AttentionMetadata) -> torch.Tensor:
        """Store this layer's new k/v and attend q [B, T, H, D] over what the step may see."""
        keys, values = self.update(layer, k, v, meta)
        return dense_attention(q, keys, values, meta.mask)
