"""CUDA graphs of decode-only steps: one graph per bucketed batch size, replayed with new inputs.

A decode step of a 7B model at batch 1 is ~15 kernels per layer, ~500 in all, and launching them one by one
from Python costs more than the weights take to stream. A graph launches them all at once. Graphs need fixed
shapes and addresses, so every input lives in a static buffer sized for the largest bucket: tokens,
positions, slots, block tables, key counts. A step of n sequences replays the smallest bucket b >= n; rows
n .. b - 1 are padding that reads and writes only the cache's scratch block. The number of key splits of the
attention kernel is fixed per bucket (`PagedKVCache.decode_splits`), for the longest context a sequence
can have: splits past a sequence's keys end at once.

A step's inputs go to the GPU as one copy: the host writes each row's token, position, slot, key count and
block table (padding rows included) into a pinned buffer, one host-to-device copy moves rows 0 .. b - 1 to a
static device buffer, and the graph's first kernel spreads its columns into the model's inputs (they were ~8
copies and conversions before each replay, then five kernels in the graph). Under torch.profiler the GPU sat
idle ~130 us a batch-1 step between those copies; without the profiler the rate did not move (H200: 265.7 ->
266.0 tok/s), the host being ~3 ms ahead, so this is one copy instead of eight, not a speed-up. The one
spread kernel instead of five saved ~0.1% (bench/README.md, seventh session).
"""

from __future__ import annotations

from collections.abc import Sequence as Seq

import numpy as np
import torch

from mistral7b.cache.paged import (KernelLaunch, KernelMetadata, PagedKVCache, PagedMetadata, Span, block_tables,
                                   decode_slots)
from mistral7b.model.transformer import Transformer

STAGED = 4  # columns of a staged row before its block table
# The staged rows spread by one kernel (kernels/graph_inputs.py); False: five PyTorch copies (to measure).
SPREAD_KERNEL = True
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
        # Row r: token, position, slot, keys, then the block table (STAGED columns before it).
        self.inputs = torch.zeros(B, STAGED + max_blocks, dtype=torch.long, device=dev)
        self.pad_row = torch.zeros(STAGED + 1, dtype=torch.long)
        self.pad_row[2] = cache.scratch_block * cache.block_size
        self.pad_row[3] = 1
        self.pad_row[STAGED] = cache.scratch_block
        self.inputs[:, : STAGED + 1] = self.pad_row.to(dev)
        self.max_keys = max_keys
        # Two pinned staging buffers used in turn: with async scheduling the next step is staged while the
        # previous step's copy may still be queued behind the running graph.
        self.staging = [torch.zeros(B, STAGED + max_blocks, dtype=torch.long).pin_memory() for _ in range(2)]
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
        rows = self.inputs[:b]
        if SPREAD_KERNEL:
            from mistral7b.kernels.graph_inputs import spread_inputs

            spread_inputs(rows, self.tokens[0, :b], self.positions[0, :b], self.slots[:b], self.seq_lens[:b],
                          self.block_tables[:b], STAGED)
        else:
            self.tokens[0, :b] = rows[:, 0]
            self.positions[0, :b] = rows[:, 1]
            self.slots[:b] = rows[:, 2]
            self.seq_lens[:b] = rows[:, 3]
            self.block_tables[:b] = rows[:, STAGED:]
        return self.model(self.tokens[:, :b], self.positions[:, :b], self.cache, logits_index=self.logits_index[:b],
                          meta=self._meta(b))

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every bucket, largest first (the smaller ones reuse its memory pool)."""
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
        rows = stage.numpy()
        starts = np.array([s.start for s in spans], dtype=np.int64)
        if not isinstance(tokens, torch.Tensor):
            rows[:n, 0] = tokens
        rows[:n, 1] = starts
        rows[:n, 2] = decode_slots(spans, self.cache.block_size)
        rows[:n, 3] = starts + 1
        table = block_tables(spans).numpy()
        rows[:n, STAGED : STAGED + table.shape[1]] = table
        rows[n:b, : STAGED + 1] = self.pad_row.numpy()  # padding: token 0 at position 0 in the scratch block
        self.inputs[:b].copy_(stage[:b], non_blocking=True)
        staged.record()
        if isinstance(tokens, torch.Tensor):
            self.inputs[:n, 0] = tokens
        graph, logits = self.graphs[b]
        graph.replay()
        return logits[:n]
