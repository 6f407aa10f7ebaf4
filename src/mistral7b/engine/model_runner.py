"""The model runner: one scheduled step in, the logits rows the engine asked for out.

It lays the step's tokens out flat ([1, N]: decodes first, then each pre-fill chunk), has the attention backend
build its metadata, zeroes newly handed-out blocks where the backend needs it, runs the model once, and returns
float32 logits on
the model's device for the requested tokens only (the output matmul is skipped for the rest). A step of
decodes alone on a GPU replays a CUDA graph instead (engine/cuda_graphs.py).
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass

import torch

from mistral7b.attention import PagedAttention
from mistral7b.cache.paged import Span
from mistral7b.cache.upload import upload
from mistral7b.distributed.channel import StepChannel
from mistral7b.engine.cuda_graphs import DecodeGraphs, GraphPicks
from mistral7b.engine.sequence import Sequence
from mistral7b.model.transformer import Transformer


@dataclass
class StepInput:
    seq: Sequence
    n: int  # tokens to compute: seq.token_ids[num_computed : num_computed + n]
    want: list[int]  # offsets within the span whose logits are needed


@dataclass
class StepPlan:
    """A step in plain Python values: what every tensor-parallel rank needs to compute it (sent to workers)."""

    spans: list[Span]  # per input, in the scheduler's order
    tokens: list[list[int]] | torch.Tensor  # per input, its n token ids; or, for a decode-only step of async
    # scheduling, a tensor [inputs] on the device: the previous step's picks (not sent to workers)
    want: list[list[int]]
    new_blocks: list[int]


class ModelRunner:
    def __init__(self, model: Transformer, attention: PagedAttention, graphs: DecodeGraphs | None = None,
                 channel: StepChannel | None = None):
        """`channel`: tensor parallelism's driver side; each step's plan goes to the workers before it runs."""
        self.model, self.attention, self.graphs, self.channel = model, attention, graphs, channel
        self.cache = attention.cache
        self.device = attention.device
        self.graph_steps = 0  # steps replayed from a CUDA graph
        self.picks: GraphPicks | None = None  # the greedy picks of the last step's rows, when its graph made them

    def run(self, steps: Seq[StepInput], new_blocks: Seq[int],
            tokens: torch.Tensor | None = None) -> tuple[torch.Tensor, list[int]]:
        """Compute the step; return logits [rows, vocab] (float32, on the device) and, per input, the first of
        its len(want) consecutive rows. `tokens` [inputs] on the device replaces the sequences' own ids for a
        decode-only step (async scheduling: their last tokens are not on the host yet)."""
        plan = StepPlan(
            spans=[Span(s.seq.num_computed, s.n, s.seq.block_table, s.seq.first_live_block) for s in steps],
            tokens=tokens if tokens is not None else
            [s.seq.token_ids[s.seq.num_computed : s.seq.num_computed + s.n] for s in steps],
            want=[s.want for s in steps], new_blocks=list(new_blocks))
        if self.channel is not None:
            self.channel.send(plan)
        return self.execute(plan)

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> tuple[torch.Tensor, list[int]]:
        spans = plan.spans
        decodes = [i for i in range(len(spans)) if spans[i].n == 1]
        prefills = [i for i in range(len(spans)) if spans[i].n > 1]
        order = decodes + prefills
        on_device = isinstance(plan.tokens, torch.Tensor)
        self.picks = None
        if self.graphs is not None and not prefills and self.graphs.fits(len(spans)):
            self.attention.zero_blocks(plan.new_blocks)
            logits = self.graphs.run(spans, plan.tokens if on_device else [t[0] for t in plan.tokens])
            self.picks = self.graphs.last_picks
            self.graph_steps += 1
            return logits, list(range(len(spans)))
        meta = self.attention.build([spans[i] for i in decodes], [spans[i] for i in prefills])
        tokens: list[int] = []
        index: list[int] = []
        offsets = {}
        count = 0
        for i in order:
            offsets[i] = len(index)
            index.extend(count + w for w in plan.want[i])
            count += spans[i].n
            if not on_device:
                tokens.extend(plan.tokens[i])
        self.attention.zero_blocks(plan.new_blocks)
        ids = (plan.tokens.view(1, -1) if on_device  # type: ignore[union-attr]
               else upload([tokens], self.device, torch.long))
        # With no logits wanted (pre-fill chunks mid-prompt), one row is still computed: the cheapest output.
        logits = self.model(ids, meta.positions, self.attention,
                            logits_index=upload(index or [0], self.device, torch.long), meta=meta)
        return logits, [offsets[i] for i in range(len(spans))]
