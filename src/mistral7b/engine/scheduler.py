"""The scheduler: which sequences compute how many tokens in the next step (continuous batching).

Each step has a token budget (`max_num_batched_tokens`). Running sequences go first, oldest first: a decode
takes one token, a sequence still in pre-fill takes its next chunk (at most `chunk_size` tokens), so long
prompts are pre-filled in chunks mixed with the running decodes. Then waiting sequences are admitted, first
come first served, while the budget, `max_num_seqs` and the block pool allow; a waiting sequence first takes
whatever the prefix cache holds of its prompt.

When a running sequence needs a block and the pool is empty, the newest running sequence is preempted: its
blocks are freed (their keys stay in the prefix cache) and it goes back to the head of the queue, to be
recomputed later from its prompt and what it has generated so far. The oldest sequence is never preempted by
a newer one, and the engine admits only sequences that fit the pool alone, so every step makes progress:
no crash, no deadlock.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from mistral7b.cache.block_manager import BlockManager
from mistral7b.engine.sequence import Sequence, Status


@dataclass
class SchedulerConfig:
    max_num_seqs: int
    max_num_batched_tokens: int
    chunk_size: int


class Scheduler:
    def __init__(self, blocks: BlockManager, config: SchedulerConfig):
        self.blocks, self.config = blocks, config
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def remove(self, seq: Sequence) -> None:
        """Take a sequence out (finished or aborted) and free its blocks."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        elif seq.status is Status.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free(seq)
        seq.status = Status.FINISHED

    def _span(self, seq: Sequence, budget: int) -> int:
        return min(seq.compute_end - seq.num_computed, self.config.chunk_size, budget)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free(seq)
        seq.num_computed = 0
        seq.status = Status.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def schedule(self) -> list[tuple[Sequence, int]]:
        """The next step: (sequence, number of tokens to compute), in admission order."""
        budget = self.config.max_num_batched_tokens
        batch: list[tuple[Sequence, int]] = []
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = self._span(seq, budget)
            while not self.blocks.allocate(seq, n):
                victim = self.running[-1]
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            else:
                batch.append((seq, n))
                budget -= n
                i += 1
        if preempted:  # the pool is short: admitting now would only preempt again
            return batch
        skipped: list[Sequence] = []
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            if seq.waits_for is not None and seq.waits_for.status is Status.RUNNING and seq.waits_for.in_prefill:
                skipped.append(self.waiting.popleft())  # its sibling is filling the prefix cache for it
                continue
            if not seq.wants_prompt_logprobs:
                self.blocks.match_prefix(seq)
            elif seq.params.prompt_logprobs_from > 1:  # scored from there: what comes before may be cached
                self.blocks.match_prefix(seq, seq.params.prompt_logprobs_from - 1)
            n = self._span(seq, budget)
            if not self.blocks.allocate(seq, n):
                self.blocks.free(seq)
                seq.num_computed = 0
                break
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            batch.append((seq, n))
            budget -= n
        self.waiting.extendleft(reversed(skipped))
        return batch
