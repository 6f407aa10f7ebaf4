"""Paged attention through the Triton kernel (kernels/paged_attention.py): the GPU's path (on a CPU only under
TRITON_INTERPRET=1, for tests). The step is planned as block tables, key counts and query offsets per sequence,
one launch for the decode rows (keys split over programs when few sequences run) and one for the pre-fill
tiles; the kernel reads the pool in place, so nothing is gathered, and it loads no slot at or past a row's
length, so new blocks need no zeroing. The pool has a scratch block after it for CUDA graphs' padding rows.
The fused projection's heads are rotated and stored by one kernel (kernels/rotary_store.py), or, for a lone
token, by wqkv's GEMV itself (`rotary`, model/one_token.py).
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass

import torch

from mistral7b.attention.base import PagedAttention, StepMetadata
from mistral7b.cache.paged import PagedKVCache, Span, block_tables
from mistral7b.cache.upload import upload
from mistral7b.config import ModelArgs
from mistral7b.kernels import gemv, paged_attention
from mistral7b.kernels.rotary_store import rotary_store
from mistral7b.kernels.tuning import DecodeTuning

DECODE_ROWS = 16  # rows of the kernel's matrix product for decode tiles: queries x padded group heads
PREFILL_ROWS = 64  # 16 queries x 4 heads for Mistral: the fastest of a sweep on an H200 (bench/README.md)
# A split takes at least 32 keys (with a limit of 1,280 tokens: 32 splits, not 20 of 64 keys: 259.2 -> 263.2;
# the most splits a sequence takes is DecodeTuning.max_splits).
MIN_SPLIT_KEYS = 32


@dataclass
class KernelLaunch:
    """One launch of the paged-attention kernel: its tiles (sequence, first query) and their shape."""

    tile_seq: torch.Tensor  # [tiles] int32
    tile_q: torch.Tensor  # [tiles] int32
    block_q: int
    num_splits: int = 1
    tokens: int | None = None  # with splits: the launch covers the step's first `tokens` tokens (its decodes)


@dataclass
class KernelMetadata(StepMetadata):
    """The step's sequences for the kernel, decodes first."""

    block_tables: torch.Tensor  # [S, max blocks] int32, 0-padded
    seq_lens: torch.Tensor  # [S] int32: keys of each sequence after this step
    query_start: torch.Tensor  # [S + 1] int32: where each sequence's new tokens start in the flat step
    launches: list[KernelLaunch]


class TritonAttention(PagedAttention):
    name = "triton"
    scratch = True
    zeroes_blocks = False
    rotates = True

    def __init__(self, cache: PagedKVCache, args: ModelArgs, tuning: DecodeTuning | None = None):
        """`tuning`: how the kernel launches (key splits, warps; kernels/tuning.py)."""
        super().__init__(cache, args)
        self.tuning = tuning or DecodeTuning()
        group_pad = 1 << (args.n_heads // args.n_kv_heads - 1).bit_length()
        self.decode_block_q = max(1, DECODE_ROWS // group_pad)
        self.prefill_block_q = max(1, PREFILL_ROWS // group_pad)
        dev = cache.device
        sms = torch.cuda.get_device_properties(dev).multi_processor_count if dev.type == "cuda" else 4
        self.target_programs = 2 * sms

    def decode_splits(self, rows: int, max_keys: int, power_of_two: bool = False) -> int:
        """Key splits per decode sequence so that rows x KV heads x splits programs about fill the GPU.
        `power_of_two`: rounded down to one, for steps that are not CUDA graphs: the split count is a constant
        of the compiled kernel, and a step's keys and decode rows vary, so otherwise each new count met while
        serving is a compile of its own (about a second, with every stream waiting)."""
        if max_keys <= 0:
            return 1
        want = -(-self.target_programs // max(1, rows * self.n_kv_heads))
        splits = max(1, min(self.tuning.max_splits, want, -(-max_keys // MIN_SPLIT_KEYS)))
        return 1 << (splits.bit_length() - 1) if power_of_two else splits

    def build(self, decodes: Seq[Span], prefills: Seq[Span]) -> KernelMetadata:
        positions, slots = self.slots(decodes, prefills)
        spans = [*decodes, *prefills]
        starts = [0]
        for s in spans:
            starts.append(starts[-1] + s.n)
        dev, i32 = self.device, torch.int32
        launches = []
        if decodes:
            window = self.window or 1 << 62
            keys = max(min(s.start + 1, window) for s in decodes)
            launches.append(KernelLaunch(torch.arange(len(decodes), dtype=i32, device=dev),
                                         torch.zeros(len(decodes), dtype=i32, device=dev),
                                         self.decode_block_q, self.decode_splits(len(decodes), keys, True),
                                         len(decodes)))
        if prefills:
            seqs, firsts = paged_attention.query_tiles([0] * len(decodes) + [s.n for s in prefills],
                                                       self.prefill_block_q)
            launches.append(KernelLaunch(upload(seqs, dev, i32), upload(firsts, dev, i32), self.prefill_block_q))
        return KernelMetadata(positions, slots, block_tables=upload(block_tables(spans), dev),
                              seq_lens=upload([s.start + s.n for s in spans], dev, i32),
                              query_start=upload(starts, dev, i32), launches=launches)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               meta: KernelMetadata) -> torch.Tensor:
        self.cache.store(layer, k, v, meta.slot_mapping)
        return self.attend_stored(layer, q[0].to(self.cache.dtype), meta).to(q.dtype).unsqueeze(0)

    def attend_heads(self, layer: int, qkv: torch.Tensor, freqs: torch.Tensor | None,
                     meta: KernelMetadata) -> torch.Tensor:
        """Rotate and store by one kernel (`freqs` unused: it rotates from the positions)."""
        cache = self.cache
        q = rotary_store(qkv.reshape(qkv.shape[1], -1), meta.positions[0], self.inv_freq, meta.slot_mapping,
                         cache.k[layer], cache.v[layer], self.n_heads)
        return self.attend_stored(layer, q, meta).unsqueeze(0)

    def rotary(self, layer: int, meta: KernelMetadata) -> gemv.Rotary:
        """What wqkv's GEMV needs to rotate a lone token's q and k and store its k and v itself."""
        return gemv.Rotary(meta.positions[0], meta.slot_mapping, self.inv_freq, self.cache.k[layer],
                           self.cache.v[layer], self.n_heads)

    def attend_stored(self, layer: int, q: torch.Tensor, meta: KernelMetadata) -> torch.Tensor:
        """Attention of q [N, H, D] over the pool, this step's keys and values already stored -> [N, H, D]."""
        out = torch.empty_like(q)
        tuning = self.tuning
        for launch in meta.launches:
            paged_attention.paged_attention(q, self.cache.k[layer], self.cache.v[layer], meta.block_tables,
                                            meta.seq_lens, meta.query_start, launch.tile_seq, launch.tile_q,
                                            self.window, launch.block_q, launch.num_splits, out=out,
                                            split_tokens=launch.tokens, decode_warps=tuning.decode_warps,
                                            kv_before_wait=tuning.kv_before_wait)
        return out
