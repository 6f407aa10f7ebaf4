"""Paged attention through the CPU extension (mistral7b/cpu/attention.cpp): decode rows read the pool in place,
with no gather and no mask; pre-fill chunks take the PyTorch path (attention/torch_paged.py). Float32 pools
attend in float32, bf16 ones (AVX-512 builds) round exactly as the gathers and matmuls do, so both paths give
the same bits. RoPE and the k/v store of the fused projection's heads are one call of the extension too.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass
from types import ModuleType

import torch

from mistral7b.attention.torch_paged import AttentionGroup, GroupMetadata, TorchAttention
from mistral7b.cache.paged import PagedKVCache, Span, block_tables
from mistral7b.config import ModelArgs


@dataclass
class NativeDecode:
    """Decode rows for the extension's attention, which reads the pool in place."""

    block_tables: torch.Tensor  # [rows, longest] int32, 0-padded
    first_blocks: torch.Tensor  # [rows] int32: each row's first live logical block
    seq_lens: torch.Tensor  # [rows] int32: keys after this step, the query's own included


def takes_shapes(args: ModelArgs, block_size: int, dtype: torch.dtype) -> bool:
    """Shapes the extension's decode attention takes: float32 pools with a head_dim of whole vectors; bf16
    ones where its sums follow oneDNN's (keys paired from the row's first block, head_dim 64 or 128 with up
    to 8 query heads a kv head), as it must to give the PyTorch path's bits."""
    if dtype == torch.float32:
        return args.head_dim % 16 == 0 and args.head_dim <= 256
    return (dtype == torch.bfloat16 and block_size % 2 == 0 and args.head_dim % 64 == 0
            and args.n_heads // args.n_kv_heads <= 8)


def extension_for(args: ModelArgs, block_size: int, dtype: torch.dtype) -> ModuleType | None:
    """The loaded extension where it is built and takes these shapes (bf16 only where its attention is exact)."""
    if not takes_shapes(args, block_size, dtype):
        return None
    from mistral7b import cpu

    ops = cpu.load()
    if ops is None or not (dtype == torch.float32 or ops.EXACT_BF16_ATTENTION):
        return None
    return ops


class NativeCpuAttention(TorchAttention):
    name = "cpu_native"
    rotates = True

    def __init__(self, cache: PagedKVCache, args: ModelArgs, ops: ModuleType):
        super().__init__(cache, args)
        self.ops = ops

    def _decode_group(self, spans: Seq[Span]) -> AttentionGroup:
        i32 = torch.int32
        native = NativeDecode(block_tables(spans), torch.tensor([s.first_live_block for s in spans], dtype=i32),
                              torch.tensor([s.start + 1 for s in spans], dtype=i32))
        return AttentionGroup(start=0, end=len(spans), rows=len(spans), queries=1, block_ids=None, block_range=None,
                              mask=None, native=native)

    def decode_only(self, meta: GroupMetadata) -> NativeDecode | None:
        """The step's decode rows when it has nothing else (the model's whole-stack decode call takes it)."""
        return meta.groups[0].native if len(meta.groups) == 1 else None  # type: ignore[return-value]

    def attend_heads(self, layer: int, qkv: torch.Tensor, freqs: torch.Tensor | None,
                     meta: GroupMetadata) -> torch.Tensor:
        """One call rotates q and k (apply_rotary's bits) and stores k and v, where apply_rotary, the split and
        two index copies dispatch ~20 ops."""
        assert freqs is not None
        cache = self.cache
        q = self.ops.rotate_store(qkv[0].contiguous(), torch.view_as_real(freqs).reshape(qkv.shape[1], -1, 2),
                                  cache.k[layer], cache.v[layer], meta.slot_mapping, self.n_heads)
        return self.attend_stored(layer, q.unsqueeze(0), meta)

    def _attend_group(self, layer: int, queries: torch.Tensor, g: AttentionGroup) -> torch.Tensor:
        if g.native is None:
            return super()._attend_group(layer, queries, g)
        n: NativeDecode = g.native  # type: ignore[assignment]
        return self.ops.decode_attention(queries, self.cache.k[layer], self.cache.v[layer], n.block_tables,
                                         n.first_blocks, n.seq_lens, self.window or 0, self.head_dim**-0.5)
