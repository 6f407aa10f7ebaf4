"""CUDA graphs of decode-only steps: one graph per bucketed batch size, replayed with new inputs.

A decode step of a 7B model at batch 1 is ~15 kernels per layer, ~500 in all, and launching them one by one
from Python costs more than the weights take to stream. A graph launches them all at once. Graphs need fixed
shapes and addresses, so every input lives in a static buffer sized for the largest bucket: tokens,
positions, slots, block tables, key counts. A step of n sequences replays the smallest bucket b >= n; rows
n .. b - 1 are padding that reads and writes only the cache's scratch block. The number of key splits of the
attention kernel is fixed per bucket (`TritonAttention.decode_splits`), for the longest context a sequence
can have: splits past a sequence's keys end at once.

A step's inputs reach the graph with no copy of their own: the host writes each row's token, position, slot,
key count and block table (padding rows included) into pinned memory, and the graph's first kernel
(kernels/graph_inputs.py) reads them from there over the bus and spreads them into the model's inputs. The
graph ends with the greedy picks of its logits (kernels/argmax.py), kept on the device as the next step's
tokens (a staged token -1 - r stands for pick r) and written to pinned memory, where the host reads them once
the step is done. Host and graph fill the pinned buffers in two turns (the host one step ahead of the GPU
with async scheduling); the graph reads its turn from a device counter it flips as its last kernel.
Before, one copy took the staged rows in before each replay, and the argmax and the picks' copy out ran after
it: three more stream operations, whose gaps cost ~44 us of a 3.73 ms batch-1 step on an H200
(bench/gpu_timeline.py, bench/README.md eighth session). `zero_copy=False` (DecodeTuning) keeps that path,
to measure.
"""

from __future__ import annotations

import gc
from collections.abc import Sequence as Seq
from dataclasses import dataclass

import numpy as np
import torch

from mistral7b.attention.triton_paged import KernelLaunch, KernelMetadata, TritonAttention
from mistral7b.cache.paged import Span, block_tables, decode_slots
from mistral7b.kernels.argmax import argmax_rows
from mistral7b.kernels.graph_inputs import spread_inputs
from mistral7b.model.transformer import Transformer

STAGED = 4  # columns of a staged row before its block table
BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512)


@dataclass
class GraphPicks:
    """The greedy picks of the last replay's rows: on the device until the next replay, and on the host (pinned)
    once that replay is done (until the replay after the next)."""

    tokens: torch.Tensor  # [n] int64 on the device
    host: torch.Tensor  # [n] int64, pinned


class DecodeGraphs:
    def __init__(self, model: Transformer, attention: TritonAttention, max_batch: int, max_blocks: int, max_keys: int,
                 zero_copy: bool = True):
        """`max_blocks`: block-table width (logical blocks of the longest sequence); `max_keys`: the most keys
        a decode query attends to (min(window, max_model_len)), which sizes the key splits. `zero_copy`
        (DecodeTuning.zero_copy): inputs read by the graph from pinned memory and picks made in the graph;
        False: a copy in, and the argmax and a copy out around the replay."""
        assert attention.device.type == "cuda"
        self.model, self.attention = model, attention
        cache = attention.cache
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
        self.zero_copy = zero_copy
        self.pad_row = torch.zeros(STAGED + 1, dtype=torch.long)
        self.pad_row[2] = cache.scratch_block * cache.block_size
        self.pad_row[3] = 1
        self.pad_row[STAGED] = cache.scratch_block
        # Row r of a turn: token, position, slot, keys, then the block table (STAGED columns before it). The host
        # fills staging[turn]; the graph reads it (zero copy) or a copy of it in `inputs`.
        self.staging = torch.zeros(2, B, STAGED + max_blocks, dtype=torch.long).pin_memory()
        self.staging[:, :, : STAGED + 1] = self.pad_row
        self.inputs = self.staging if self.zero_copy else self.staging[:1].to(dev)
        self.turn_of_graph = torch.zeros(1, **i32)  # the turn the next replay reads (zero copy; else always 0)
        self.picks = torch.zeros(B, dtype=torch.long, device=dev)  # the last replay's greedy picks
        self.host_picks = torch.zeros(2, B, dtype=torch.long).pin_memory()
        # Per turn, the last replay that used it; the host refills a turn once that replay is done.
        self.done = [torch.cuda.Event(), torch.cuda.Event()]
        self.turn = 0
        self.last_picks: GraphPicks | None = None
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None

    def _meta(self, b: int) -> KernelMetadata:
        launch = KernelLaunch(self.tile_seq[:b], self.tile_q[:b], self.attention.decode_block_q,
                              self.attention.decode_splits(b, self.max_keys))
        return KernelMetadata(self.positions[:, :b], self.slots[:b], self.block_tables[:b], self.seq_lens[:b],
                              self.query_start[: b + 1], [launch])

    def _forward(self, b: int) -> torch.Tensor:
        spread_inputs(self.inputs[:, :b], self.turn_of_graph, self.picks, self.tokens[0, :b], self.positions[0, :b],
                      self.slots[:b], self.seq_lens[:b], self.block_tables[:b], STAGED)
        logits = self.model(self.tokens[:, :b], self.positions[:, :b], self.attention,
                            logits_index=self.logits_index[:b], meta=self._meta(b))
        if self.zero_copy:
            argmax_rows(logits, self.picks[:b], self.host_picks, self.turn_of_graph)
            self.turn_of_graph.bitwise_xor_(1)
        return logits

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every bucket, largest first (the smaller ones reuse its memory pool). Python's garbage
        collector is held off meanwhile: freeing an older engine's pinned buffers or graphs mid-capture calls
        CUDA on other streams, which invalidates the capture (seen on an H200 as a failed cuBLAS call)."""
        stream = torch.cuda.Stream(self.attention.device)
        stream.wait_stream(torch.cuda.current_stream(self.attention.device))
        with torch.cuda.stream(stream):  # warm-up: compiles the Triton kernels, sets up cuBLAS
            for b in self.buckets:
                self._forward(b)
        torch.cuda.current_stream(self.attention.device).wait_stream(stream)
        gc.collect()
        collecting = gc.isenabled()
        gc.disable()
        try:
            for b in reversed(self.buckets):
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self.pool):
                    logits = self._forward(b)
                self.pool = graph.pool()
                self.graphs[b] = (graph, logits)
        finally:
            if collecting:
                gc.enable()
        torch.cuda.synchronize(self.attention.device)
        self.turn_of_graph.zero_()  # the warm-up flipped it
        self.turn = 0

    def fits(self, n: int) -> bool:
        return 0 < n <= self.buckets[-1]

    @torch.inference_mode()
    def run(self, spans: Seq[Span], tokens: Seq[int] | torch.Tensor) -> torch.Tensor:
        """Logits [n, vocab] (float32, on the GPU; valid until the next replay) of n decode rows, and in
        `last_picks` their greedy picks (zero copy). `tokens`: the rows' input ids, a list, or a tensor on the GPU
        (async scheduling: the previous step's picks; `last_picks.tokens` is read where it lies)."""
        n = len(spans)
        b = next(b for b in self.buckets if b >= n)
        turn = self.turn
        self.turn ^= 1
        self.done[turn].synchronize()  # the replay that last read this turn's rows is done
        rows = self.staging[turn].numpy()
        starts = np.array([s.start for s in spans], dtype=np.int64)
        if isinstance(tokens, torch.Tensor):
            if tokens.data_ptr() != self.picks.data_ptr() or len(tokens) != n:
                self.picks[:n].copy_(tokens, non_blocking=True)  # the graph reads them from the picks buffer
            rows[:n, 0] = -1 - np.arange(n)
        else:
            rows[:n, 0] = tokens
        rows[:n, 1] = starts
        rows[:n, 2] = decode_slots(spans, self.attention.block_size)
        rows[:n, 3] = starts + 1
        table = block_tables(spans).numpy()
        rows[:n, STAGED : STAGED + table.shape[1]] = table
        rows[n:b, : STAGED + 1] = self.pad_row.numpy()  # padding: token 0 at position 0 in the scratch block
        if not self.zero_copy:
            self.inputs[0, :b].copy_(self.staging[turn, :b], non_blocking=True)
        graph, logits = self.graphs[b]
        graph.replay()
        self.done[turn].record()
        self.last_picks = GraphPicks(self.picks[:n], self.host_picks[turn, :n]) if self.zero_copy else None
        return logits[:n]
