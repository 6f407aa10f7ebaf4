"""CUDA graphs of decode-only steps: one graph per bucketed batch size, replayed with new inputs.

A decode step of a 7B model at batch 1 is ~15 kernels per layer, ~500 in all, and launching them one by one
from Python costs more than the weights take to stream. A graph launches them all at once. Graphs need fixed
shapes and addresses, so every input lives in a static buffer sized for the largest bucket: tokens,
positions, slots, block tables, key counts. A step of n sequences replays the smallest bucket b >= n; rows
n .. b - 1 are padding that reads and writes only the cache's scratch block. The number of key splits of the
attention kernel is fixed per bucket (`PagedKVCache.decode_splits`), for the longest context a sequence
can have: splits past a sequence's keys end at once.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq

import torch

from mistral7b.cache.paged import (KernelLaunch, KernelMetadata, PagedKVCache, PagedMetadata, Span, block_tables,
                                   decode_slots)
from mistral7b.cache.upload import upload
from mistral7b.model.transformer import Transformer

BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512)


class DecodeGraphs:
    def __init__(self, model: Transformer, cache: PagedKVCache, max_batch: int, max_blocks: int, max_keys: int):
        """`max_blocks`: block-table width (logical blocks of the longest sequence); `max_keys`: the most keys
        a decode query attends to (min(window, max_model_len)), which sizes the key splits."""
        assert cache.use_kernel and cache.device.type == "cuda"
        self.model, self.cache = model, cache
        self.buckets = [b for b in BUCKETS if b < max_batch] + [max_batch]
        dev = cache.device
        B = self.buckets[-1]
        i32 = dict(dtype=torch.int32, device=dev)
        self.tokens = torch.zeros(1, B, dtype=torch.long, device=dev)
        self.positions = torch.zeros(1, B, dtype=torch.long, device=dev)
        self.slots = torch.zeros(B, dtype=torch.long, device=dev)
        self.block_tables = torch.zeros(B, max_blocks, **i32)
        self.seq_lens = torch.ones(B, **i32)
        self.query_start = torch.arange(B + 1, **i32)
        self.tile_seq = torch.arange(B, **i32)
        self.tile_q = torch.zeros(B, **i32)
        self.logits_index = torch.arange(B, dtype=torch.long, device=dev)
        self.max_keys = max_keys
        # Two pinned staging buffers used in turn: with async scheduling the next step is staged while the
        # previous step's copy may still be queued behind the running graph.
        self.staging = [torch.zeros(4, B, dtype=torch.long).pin_memory() for _ in range(2)]
        self.staged = [torch.cuda.Event(), torch.cuda.Event()]
        self.turn = 0
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None

    def _meta(self, b: int) -> PagedMetadata:
        launch = KernelLaunch(self.tile_seq[:b], self.tile_q[:b], self.cache.decode_block_q,
                              self.cache.decode_splits(b, self.max_keys))
        kernel = KernelMetadata(self.block_tables[:b], self.seq_lens[:b], self.query_start[: b + 1], [launch])
        return PagedMetadata(self.positions[:, :b], self.slots[:b], [], kernel)

    def _forward(self, b: int) -> torch.Tensor:
        return self.model(self.tokens[:, :b], self.positions[:, :b], self.cache, logits_index=self.logits_index[:b],
                          meta=self._meta(b))

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every bucket, largest first (the smaller ones reuse its memory pool)."""
        self._pad_from(0)
        stream = torch.cuda.Stream(self.cache.device)
        stream.wait_stream(torch.cuda.current_stream(self.cache.device))
        with torch.cuda.stream(stream):  # warm-up: compiles the Triton kernels, sets up cuBLAS
            for b in self.buckets:
                self._forward(b)
        torch.cuda.current_stream(self.cache.device).wait_stream(stream)
        for b in reversed(self.buckets):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                logits = self._forward(b)
            self.pool = graph.pool()
            self.graphs[b] = (graph, logits)
        torch.cuda.synchronize(self.cache.device)

    def _pad_from(self, n: int) -> None:
        """Rows n.. : token 0 at position 0, written to and read from the scratch block only."""
        scratch = self.cache.scratch_block
        self.tokens[:, n:] = 0
        self.positions[:, n:] = 0
        self.slots[n:] = scratch * self.cache.block_size
        self.seq_lens[n:] = 1
        self.block_tables[n:, 0] = scratch

    def fits(self, n: int) -> bool:
        return 0 < n <= self.buckets[-1]

    @torch.inference_mode()
    def run(self, spans: Seq[Span], tokens: Seq[int] | torch.Tensor) -> torch.Tensor:
        """Logits [n, vocab] (float32, on the GPU; valid until the next replay) of n decode rows. `tokens`: the
        rows' input ids, a list, or a tensor on the GPU (async scheduling: the previous step's picks)."""
        n = len(spans)
        b = next(b for b in self.buckets if b >= n)
        self.turn ^= 1
        stage, staged = self.staging[self.turn], self.staged[self.turn]
        staged.synchronize()  # the copy out of this buffer two steps ago is done
        starts = [s.start for s in spans]
        ids = [0] * n if isinstance(tokens, torch.Tensor) else tokens
        stage[:3, :n] = torch.tensor([ids, starts, decode_slots(spans, self.cache.block_size)])
        stage[3, :n] = stage[1, :n] + 1
        gpu = stage[:, :n].to(self.cache.device, non_blocking=True)
        staged.record()
        self.tokens[0, :n] = tokens if isinstance(tokens, torch.Tensor) else gpu[0]
        self.positions[0, :n] = gpu[1]
        self.slots[:n] = gpu[2]
        self.seq_lens[:n] = gpu[3]
        table = block_tables(spans)
        self.block_tables[:n, : table.shape[1]].copy_(upload(table, self.cache.device))
        if b > n:
            self._pad_from(n)
        graph, logits = self.graphs[b]
        graph.replay()
        return logits[:n]
