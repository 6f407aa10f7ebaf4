"""The model runner: one scheduled step in, the logits rows the engine asked for out.

It lays the step's tokens out flat ([1, N]: decodes first, then each pre-fill chunk), has the paged cache plan
the attention metadata, zeroes newly handed-out blocks, runs the model once, and returns float32 logits on
the model's device for the requested tokens only (the output matmul is skipped for the rest). A step of
decodes alone on a GPU replays a CUDA graph instead (engine/cuda_graphs.py).
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass

import torch

from mistral7b.cache.paged import PagedKVCache, Span
from mistral7b.engine.cuda_graphs import DecodeGraphs
from mistral7b.engine.sequence import Sequence
from mistral7b.model.transformer import Transformer


@dataclass
class StepInput:
    seq: Sequence
    n: int  # tokens to compute: seq.token_ids[num_computed : num_computed + n]
    want: list[int]  # offsets within the span whose logits are needed


class ModelRunner:
    def __init__(self, model: Transformer, cache: PagedKVCache, graphs: DecodeGraphs | None = None):
        self.model, self.cache, self.graphs = model, cache, graphs
        self.device = cache.device
        self.graph_steps = 0  # steps replayed from a CUDA graph

    @torch.inference_mode()
    def run(self, steps: Seq[StepInput], new_blocks: Seq[int]) -> tuple[torch.Tensor, list[int]]:
        """Compute the step; return logits [rows, vocab] (float32, on the device) and, per input, the first of
        its len(want) consecutive rows."""
        decodes = [i for i in range(len(steps)) if steps[i].n == 1]
        prefills = [i for i in range(len(steps)) if steps[i].n > 1]
        order = decodes + prefills

        def span(i: int) -> Span:
            s = steps[i]
            return Span(s.seq.num_computed, s.n, s.seq.block_table, s.seq.first_live_block)

        if self.graphs is not None and not prefills and self.graphs.fits(len(steps)):
            self.cache.zero_blocks(new_blocks)
            logits = self.graphs.run([span(i) for i in range(len(steps))],
                                     [s.seq.token_ids[s.seq.num_computed] for s in steps])
            self.graph_steps += 1
            return logits, list(range(len(steps)))
        meta = self.cache.plan([span(i) for i in decodes], [span(i) for i in prefills])
        tokens, index, offsets = [], [], {}
        for i in order:
            s = steps[i]
            offsets[i] = len(index)
            index.extend(len(tokens) + w for w in s.want)
            tokens.extend(s.seq.token_ids[s.seq.num_computed : s.seq.num_computed + s.n])
        self.cache.zero_blocks(new_blocks)
        # With no logits wanted (pre-fill chunks mid-prompt), one row is still computed: the cheapest output.
        logits = self.model(torch.tensor([tokens], device=self.device), meta.positions, self.cache,
                            logits_index=torch.tensor(index or [0], device=self.device), meta=meta)
        return logits, [offsets[i] for i in range(len(steps))]
