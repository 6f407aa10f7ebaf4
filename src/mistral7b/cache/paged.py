"""The paged KV cache's storage: per layer, a pool of blocks [n_kv_heads, num_blocks, block_size, head_dim] for
keys and for values, shared by every sequence through its block table (cache/block_manager.py decides who holds
what). Heads come first so that gathering the blocks of S sequences gives [n_kv_heads, S, keys, head_dim], which
the attention matmuls read as it is (no transposed copy of the keys each layer).

One engine step computes a flat list of tokens from many sequences ([1, N]: decodes first, then pre-fill
chunks); each is stored at its slot (slot = block * block_size + offset, `step_slots`). How a step attends over
the pool is the attention backend's business (mistral7b/attention): each builds its own metadata from the
step's `Span`s and reads the pool its own way.

Worked example, B = 4, W = 6, one sequence at its decode step for position 9 (tokens 0..8 computed):
    first needed position 9 - 6 + 1 = 4 -> first live logical block 1 (block 0 was released);
    its slot is block_table[9 // 4] * 4 + 9 % 4; it attends to keys 4..9, i.e. W = 6 keys, itself included.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass

import numpy as np
import torch

from mistral7b.cache.upload import upload
from mistral7b.config import ModelArgs


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


def step_slots(decodes: Seq[Span], prefills: Seq[Span], block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(positions, slots), int64, of a step's flat tokens: the decode spans (n = 1) in order, then each pre-fill.
    One entry per decode, then whole pre-fill chunks through numpy (a Python loop over 8K pre-fill tokens took
    ~2 ms a step, with the GPU waiting)."""
    positions = [np.array([s.start for s in decodes], dtype=np.int64)]
    slots = [np.array(decode_slots(decodes, block_size), dtype=np.int64)]
    for span in prefills:
        pos = np.arange(span.start, span.start + span.n, dtype=np.int64)
        positions.append(pos)
        slots.append(np.asarray(span.block_table, dtype=np.int64)[pos // block_size] * block_size + pos % block_size)
    return np.concatenate(positions), np.concatenate(slots)


def block_tables(spans: Seq[Span]) -> torch.Tensor:
    """The spans' block tables as one int32 [S, longest] tensor, zero-padded (filled row by row through numpy:
    twice as fast as torch.tensor on nested lists)."""
    table = np.zeros((len(spans), max(len(s.block_table) for s in spans)), dtype=np.int32)
    for i, s in enumerate(spans):
        table[i, : len(s.block_table)] = s.block_table
    return torch.from_numpy(table)


class PagedKVCache:
    def __init__(self, args: ModelArgs, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu", scratch: bool = False):
        """`num_blocks` physical blocks including the null block 0. Memory is reserved, not touched: a block is
        zeroed when it is handed out (where the backend needs it), so resident memory follows what is used.
        `scratch`: one more block after the pool, which padded rows of a CUDA graph write to."""
        self.window, self.block_size = args.sliding_window, block_size
        self.n_kv_heads, self.head_dim, self.n_heads = args.n_kv_heads, args.head_dim, args.n_heads
        self.dtype, self.device = dtype, torch.device(device)
        self.num_blocks = num_blocks
        self.scratch_block = num_blocks if scratch else None
        shape = (args.n_kv_heads, num_blocks + (1 if scratch else 0), block_size, args.head_dim)
        self.k = [torch.empty(shape, dtype=dtype, device=self.device) for _ in range(args.n_layers)]
        self.v = [torch.empty(shape, dtype=dtype, device=self.device) for _ in range(args.n_layers)]
        self.zero_blocks([0])  # the null block: tables pad with it, and keys a mask drops still meet their values

    @staticmethod
    def block_bytes(args: ModelArgs, block_size: int, dtype: torch.dtype) -> int:
        """Bytes of one block over all layers, keys and values."""
        itemsize = torch.empty(0, dtype=dtype).element_size()
        return 2 * args.n_layers * block_size * args.n_kv_heads * args.head_dim * itemsize

    def zero_blocks(self, blocks: Seq[int]) -> None:
        if not blocks:
            return
        idx = upload(list(blocks), self.device, torch.long)
        for t in self.k + self.v:
            t.index_fill_(1, idx, 0)

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """Write a step's k/v [1, N, H_kv, D] to their slots."""
        H_kv, D = self.n_kv_heads, self.head_dim
        self.k[layer].view(H_kv, -1, D).index_copy_(1, slot_mapping, k[0].transpose(0, 1).to(self.dtype))
        self.v[layer].view(H_kv, -1, D).index_copy_(1, slot_mapping, v[0].transpose(0, 1).to(self.dtype))
