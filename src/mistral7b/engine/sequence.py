"""A Sequence: one completion of one request, as the scheduler, the block manager and the runner see it.

A request with n completions is n sequences sharing the prompt. A sequence's tokens are its prompt followed
by what it has generated; `num_computed` of them have their keys/values in the KV cache. Each engine step
computes the next span of uncomputed tokens (a pre-fill chunk, or the one new token of a decode), and when
the span reaches the last token, the logits there give the next token. Pre-fill, decode, and recomputation
after preemption are therefore the same operation.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from mistral7b.engine.detokenizer import IncrementalDetokenizer
from mistral7b.engine.sampling_params import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    seq_id: int
    request_id: str
    index: int  # which of the request's n completions
    token_ids: list[int]  # prompt, then output
    num_prompt: int
    params: SamplingParams
    eos_ids: frozenset[int]
    detok: IncrementalDetokenizer | None
    seed: int | None  # the sampler draws its uniforms from it (engine/sampler.py counter_uniforms)
    arrival: float
    status: Status = Status.WAITING
    num_computed: int = 0  # tokens whose keys/values are in the cache
    block_table: list[int] = field(default_factory=list)  # logical block -> physical block; -1 = released
    first_live_block: int = 0  # blocks before this one left the window and were released
    block_hashes: list[bytes] = field(default_factory=list)  # chained hashes of full blocks (prefix cache)
    num_committed_blocks: int = 0  # full, computed blocks offered to the prefix cache
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache at admission
    output_logprobs: list[float] = field(default_factory=list)
    output_top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    # prompt_logprobs[t] = (log p(token t | tokens < t), top ones) for t >= 1, filled as the pre-fill runs
    prompt_logprobs: list[tuple[float, list[tuple[int, float]]] | None] | None = None
    prompt_logprobs_sent: bool = False
    prompt_ranks: list[int | None] | None = None  # rank of prompt token t among all tokens (1: the most likely)
    finish_reason: str | None = None
    waits_for: Sequence | None = None  # a sibling whose pre-fill fills the prefix cache for this one
    num_preemptions: int = 0
    slot: int | None = None  # the sampler's slot (engine/sampler.py) while it holds one
    matcher: object | None = None  # the grammar's state, with a structured output (engine/structured_output.py)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def compute_end(self) -> int:
        """Tokens to compute: all of them, but a scored prompt's last (nothing is generated after it, and its
        log-probability comes from the position before)."""
        return self.num_tokens - 1 if self.params.max_tokens == 0 else self.num_tokens

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt :]

    @property
    def num_output(self) -> int:
        return len(self.token_ids) - self.num_prompt

    @property
    def in_prefill(self) -> bool:
        return self.num_computed < self.num_prompt

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    @property
    def wants_prompt_logprobs(self) -> bool:
        """True until the prompt's log-probabilities are reported (once, even if the sequence is preempted)."""
        return self.prompt_logprobs is not None and not self.prompt_logprobs_sent
