"""LLMEngine: the one generation engine behind `LLM` (offline) and the server (online).

Requests come in with `add_request` and leave when done or on `abort_request`; each `step` schedules a batch
(continuous batching over the paged KV cache), runs the model once, samples one token for every sequence whose
computed span reached its last token, and returns the stream events of that step. The engine is synchronous
and single-threaded: the server drives it from the engine core's loop in its own process (server/engine_core.py).
"""

from __future__ import annotations

import time
from collections.abc import Hashable
from dataclasses import dataclass

import torch

from mistral7b import attention, cpu
from mistral7b.cache.block_manager import BlockManager, max_blocks_per_seq
from mistral7b.cache.paged import PagedKVCache
from mistral7b.cache.upload import upload
from mistral7b.distributed.channel import StepChannel
from mistral7b.engine.cuda_graphs import DecodeGraphs
from mistral7b.engine.detokenizer import IncrementalDetokenizer
from mistral7b.engine.config import EngineConfig
from mistral7b.engine.kv_memory import cuda_kv_memory
from mistral7b.engine.model_runner import ModelRunner, StepInput
from mistral7b.engine.outputs import EngineStats, StreamEvent
from mistral7b.engine.processor import PromptLimits
from mistral7b.engine.sampler import Sampler, SamplerOutput
from mistral7b.engine.sampling_params import SamplingParams
from mistral7b.engine.scheduler import Scheduler, SchedulerConfig
from mistral7b.engine.structured_output import Grammars
from mistral7b.engine.sequence import Sequence, Status
from mistral7b.errors import RequestError
from mistral7b.model import cpu_decode, forward_plans
from mistral7b.model.transformer import Transformer
from mistral7b.tokenizer import Tokenizer

DEFAULT_CPU_KV_MEMORY = 1 << 30
TENSOR_PARALLEL_KV_FRACTION = 0.5  # of the free GPU memory, where no step can be measured (engine/kv_memory.py)


def _rows(logits: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """logits[rows]: a view when the rows are consecutive (a decode step), else one index copy."""
    if rows == list(range(rows[0], rows[0] + len(rows))):
        return logits[rows[0] : rows[0] + len(rows)]
    return logits.index_select(0, upload(rows, logits.device, torch.long))


@dataclass
class Sample:
    """One sequence's draw, on the host."""

    token: int
    logprob: float | None = None  # raw log-probability of `token`, when the request asks for logprobs
    top: list[tuple[int, float]] | None = None  # the top_logprobs most likely (token, log-probability)


def _host_samples(out: SamplerOutput, seqs: list[Sequence], tensors: list[torch.Tensor] | None = None) -> list[Sample]:
    """The draws of `seqs` (rows of `out`, or their host copies `tensors`) as Samples: one read of each tensor."""
    tokens, logprobs, top_ids, top_lps = tensors or [out.tokens, out.logprobs, out.top_ids, out.top_logprobs]
    tokens = tokens.tolist()
    logprobs = logprobs.tolist() if logprobs is not None else None
    top_ids = top_ids.tolist() if top_ids is not None else None
    top_lps = top_lps.tolist() if top_lps is not None else None
    samples = []
    for i, seq in enumerate(seqs):
        p = seq.params
        top = list(zip(top_ids[i][: p.top_logprobs], top_lps[i][: p.top_logprobs])) if p.top_logprobs else None
        samples.append(Sample(tokens[i], logprobs[i] if p.logprobs and logprobs is not None else None, top))
    return samples


@dataclass
class PendingStep:
    """A decode step whose draws are still on their way to the host (async scheduling)."""

    seqs: list[Sequence]
    tokens: torch.Tensor  # [n] picks on the device: the next step's input
    out: SamplerOutput  # the draws on the device
    host: list[torch.Tensor | None]  # their copies on the host (pinned), valid once `done` has completed
    done: torch.cuda.Event | None  # None on a CPU: everything above is already there


def build_runner(model: Transformer, config: EngineConfig, num_blocks: int,
                 channel: StepChannel | None = None) -> ModelRunner:
    """The paged cache (num_blocks usable blocks + the null block) and its attention backend, the model's fast
    paths for that backend, decode graphs where they apply, the runner: built the same way by the engine and by
    each tensor-parallel worker."""
    device = model.norm.weight.device
    args = model.args
    backend = attention.build(args, num_blocks + 1, config.block_size, model.dtype, device, config.attention,
                              config.tuning)
    model.plans = forward_plans.choose(model, backend.name, config.tuning)  # chosen once, here
    graphs = None
    if config.cuda_graphs and backend.name == "triton" and device.type == "cuda":
        keys = min(args.sliding_window or config.max_model_len, config.max_model_len)
        graphs = DecodeGraphs(model, backend, config.max_num_seqs, -(-config.max_model_len // config.block_size) + 1,
                              keys, zero_copy=config.tuning.zero_copy)
        graphs.capture()
    return ModelRunner(model, backend, graphs, channel)


class LLMEngine:
    def __init__(self, model: Transformer, tokenizer: Tokenizer | None, config: EngineConfig,
                 channel: StepChannel | None = None):
        """`channel`: set on rank 0 of a tensor-parallel group (distributed/launch.py)."""
        config.validate()
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.args = model.args
        device = model.norm.weight.device
        bs, window = config.block_size, self.args.sliding_window
        per_seq = max_blocks_per_seq(config.max_model_len, config.chunk_size, bs, window)
        block_bytes = PagedKVCache.block_bytes(self.args, bs, model.dtype)
        num_blocks = config.num_blocks or min(per_seq * config.max_num_seqs,
                                              max(1, self._kv_memory(device, channel) // block_bytes))
        if channel is not None:  # tensor parallelism: the workers build the same cache and graphs now
            channel.send(("setup", config, num_blocks))
        self.runner = build_runner(model, config, num_blocks, channel)
        self._pool_decode = self.runner.device.type == "cpu" and cpu_decode.quantized(model)
        self.attention = self.runner.attention
        self.cache = self.attention.cache
        self.blocks = BlockManager(num_blocks, bs, window, config.enable_prefix_caching)
        budget = config.max_num_batched_tokens or max(config.chunk_size, config.max_num_seqs)
        self.scheduler = Scheduler(self.blocks, SchedulerConfig(config.max_num_seqs, budget, config.chunk_size))
        self.vocab_size = getattr(model, "global_args", self.args).vocab_size
        self.limits = PromptLimits(self.vocab_size, config.max_model_len, config.chunk_size, bs, window, num_blocks)
        # slots for twice the running batch: preempted sequences keep theirs until one is needed
        self.sampler = Sampler(2 * config.max_num_seqs, self.vocab_size, device,
                               argmax_kernel=config.tuning.argmax_kernel)
        self.grammars = Grammars(tokenizer, self.vocab_size)
        self.requests: dict[Hashable, list[Sequence]] = {}
        self._pending: PendingStep | None = None  # async scheduling: a decode step not read back yet
        self._next_seq_id = 0
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0

    def _kv_memory(self, device: torch.device, channel: StepChannel | None) -> int:
        if self.config.kv_cache_memory is not None:
            return self.config.kv_cache_memory
        if device.type != "cuda":
            return DEFAULT_CPU_KV_MEMORY
        if channel is not None:  # a step would need the other ranks, which are not set up yet
            return int(torch.cuda.mem_get_info(device)[0] * TENSOR_PARALLEL_KV_FRACTION)
        return cuda_kv_memory(self.model, self.config, device, lambda m, c: type(self)(m, None, c))

    # ---- requests ------------------------------------------------------------------------------------
    def check_prompt(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """RequestError unless this prompt with this many new tokens can run here."""
        self.limits.check(prompt_ids, params)

    def stats(self) -> EngineStats:
        """The gauges and counters a server reports (server/metrics.py), read now."""
        return EngineStats(self.num_running, self.blocks.usage, self.scheduler.num_preemptions,
                           self.blocks.prefix_queries, self.blocks.prefix_hits)

    def add_request(self, request_id: Hashable, prompt_ids: list[int], params: SamplingParams,
                    arrival: float | None = None) -> None:
        if request_id in self.requests:
            raise RequestError(f"request id {request_id!r} is already running")
        self.check_prompt(prompt_ids, params)
        eos = frozenset() if params.ignore_eos or self.tokenizer is None else self.tokenizer.eos_ids
        matchers = [self.grammars.matcher(params.structured) for _ in range(params.n)] if params.structured else None
        seqs = []
        for index in range(params.n):
            seq = Sequence(
                seq_id=self._next_seq_id, request_id=request_id, index=index, token_ids=list(prompt_ids),
                num_prompt=len(prompt_ids), params=params, eos_ids=eos,
                detok=IncrementalDetokenizer(self.tokenizer.decode, params.stop) if self.tokenizer else None,
                seed=params.seed + index if params.seed is not None else None,
                arrival=arrival if arrival is not None else time.monotonic(),
                prompt_logprobs=[None] * len(prompt_ids) if params.prompt_logprobs is not None else None,
                prompt_ranks=[None] * len(prompt_ids) if params.prompt_logprobs is not None else None,
                matcher=matchers[index] if matchers else None,
            )
            if seqs and self.blocks.enable_prefix_caching:
                seq.waits_for = seqs[0]
            self._next_seq_id += 1
            seqs.append(seq)
        self.requests[request_id] = seqs
        for seq in seqs:
            self.scheduler.add(seq)
        self.prompt_tokens_total += len(prompt_ids)

    def abort_request(self, request_id: Hashable) -> bool:
        """Stop a request at any stage and free its blocks; False if it is not here (already done)."""
        seqs = self.requests.pop(request_id, None)
        if seqs is None:
            return False
        for seq in seqs:
            if not seq.finished:
                self.scheduler.remove(seq)
            self._release(seq)
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work() or self._pending is not None

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    # ---- one step ------------------------------------------------------------------------------------
    def step(self) -> list[StreamEvent]:
        if self._pending is not None:
            return self._advance()
        batch = self.scheduler.schedule()
        if not batch:
            return []
        if self._pool_decode and all(n == 1 for _, n in batch):  # the extension's kernels do the matmuls
            with cpu.decode_threads():
                return self._step(batch)
        return self._step(batch)

    def _step(self, batch: list[tuple[Sequence, int]]) -> list[StreamEvent]:
        inputs = []
        for seq, n in batch:
            start = seq.num_computed
            want = []
            if seq.wants_prompt_logprobs:  # rows at positions that predict a prompt token (from ..._from on)
                lo = max(0, seq.params.prompt_logprobs_from - 1 - start)
                want = list(range(lo, max(lo, min(n, seq.num_prompt - 1 - start))))
            if start + n == seq.num_tokens:  # the row the next token is drawn from
                want.append(n - 1)
            inputs.append(StepInput(seq, n, want))
        logits, first_rows = self.runner.run(inputs, self.blocks.take_new_blocks())
        ready: list[tuple[Sequence, int]] = []  # sequences to sample, and the row of their logits
        scored: list[Sequence] = []  # prompts scored with nothing to generate (max_tokens 0)
        for inp, first in zip(inputs, first_rows):
            seq = inp.seq
            start = seq.num_computed
            seq.num_computed += inp.n
            self.blocks.commit(seq)
            if seq.wants_prompt_logprobs and inp.want:
                self._record_prompt_logprobs(seq, start + inp.want[0], logits[first : first + len(inp.want)])
            if seq.params.max_tokens == 0:
                if seq.num_computed == seq.compute_end:
                    scored.append(seq)
            elif seq.num_computed == seq.num_tokens:
                ready.append((seq, first + len(inp.want) - 1))
        events: list[StreamEvent] = [e for seq in scored for e in self._finish_scored(seq)]
        if not scored and self._may_overlap(inputs, ready):
            self._pending = self._launch_picks([seq for seq, _ in ready], _rows(logits, [row for _, row in ready]),
                                               [row for _, row in ready])
            return self._advance()
        drawn = list(zip([seq for seq, _ in ready], self._choose(ready, logits)))
        self._consume(drawn)
        for seq, sample in drawn:
            events.extend(self._emit(seq, sample))
        return events

    @staticmethod
    def _plain(seq: Sequence, ahead: int = 0) -> bool:
        """Greedy with nothing that changes the logits or asks for more than the pick: what a decode graph's own
        argmax gives exactly. `ahead`: tokens the sequence will have gained by the time the pick is read."""
        p = seq.params
        return (p.greedy and seq.matcher is None and not p.logit_bias and p.repetition_penalty == 1.0
                and not p.presence_penalty
                and not p.frequency_penalty and not p.top_logprobs and seq.num_output + ahead >= p.min_tokens)

    # ---- sampling ------------------------------------------------------------------------------------
    def _slot(self, seq: Sequence) -> int:
        """The sequence's slot in the sampler (admitted on its first draw, or again after it gave it back)."""
        if seq.slot is None:
            if not self.sampler.free:  # sequences preempted meanwhile give theirs back
                for owner in list(self.sampler.owner):
                    if owner is not None and owner.status is not Status.RUNNING:
                        self._release(owner)  # type: ignore[arg-type]
            seq.slot = self.sampler.admit(seq, seq.params, seq.token_ids[: seq.num_prompt], seq.output_ids,
                                          [*seq.eos_ids, *seq.params.stop_token_ids], seed=seq.seed)
        return seq.slot

    def _release(self, seq: Sequence) -> None:
        if seq.slot is not None:
            self.sampler.release(seq.slot, seq.params)
            seq.slot = None

    def _draw(self, seqs: list[Sequence], logits: torch.Tensor) -> SamplerOutput:
        """The next token of each sequence from its row of logits [n, vocab], on the device, without a read.
        Rows with a grammar get its bitmask, filled on the host while the step's kernels run."""
        slots = upload([self._slot(seq) for seq in seqs], logits.device, torch.long)
        allowed = None
        if any(seq.matcher is not None for seq in seqs):
            allowed = self.grammars.bitmask([seq.matcher for seq in seqs]).to(logits.device, non_blocking=True)
        return self.sampler.sample(logits, slots, logprobs=any(seq.params.logprobs for seq in seqs),
                                   top_logprobs=max(seq.params.top_logprobs for seq in seqs), allowed=allowed)

    # ---- async scheduling ----------------------------------------------------------------------------
    # After a decode step, the next step is launched from the draws still on the device (every sequence assumed
    # to go on), and only then are the draws read back and turned into events, so the host's bookkeeping runs
    # while the GPU computes. A sequence that turns out to have finished wasted one row of the step launched
    # ahead; its result is dropped. New requests wait until the step in flight is read back, then go through
    # the scheduler as usual.
    def _may_overlap(self, inputs: list[StepInput], ready: list[tuple[Sequence, int]]) -> bool:
        wanted = self.config.async_scheduling
        if wanted is None:
            wanted = self.runner.graphs is not None
        return (wanted and self.runner.channel is None and len(ready) == len(inputs)
                and all(inp.n == 1 and not inp.seq.wants_prompt_logprobs for inp in inputs))

    def _launch_picks(self, seqs: list[Sequence], logits: torch.Tensor, rows: list[int], ahead: int = 0) -> PendingStep:
        """The draws of logits [n, vocab] (the step's rows `rows`) on the device, and their copy to the host,
        without waiting; a decode graph has made greedy picks already when it made all of its rows."""
        picks = self.runner.picks
        if picks is not None and rows == list(range(len(picks.tokens))) and all(
                self._plain(seq, ahead) and not seq.params.logprobs for seq in seqs):
            out = SamplerOutput(picks.tokens)
            host: list[torch.Tensor | None] = [picks.host, None, None, None]
        else:
            out = self._draw(seqs, logits)
            host = [out.tokens, out.logprobs, out.top_ids, out.top_logprobs]
            if out.tokens.device.type == "cuda":
                copies = []
                for t in host:
                    if t is not None:
                        pinned = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                        pinned.copy_(t, non_blocking=True)
                        t = pinned
                    copies.append(t)
                host = copies
        done = None
        if out.tokens.device.type == "cuda":
            done = torch.cuda.Event()
            done.record()
        return PendingStep(seqs, out.tokens, out, host, done)

    def _advance(self) -> list[StreamEvent]:
        """Launch the step after the pending one if it may run ahead, then read the pending one back."""
        pending, ahead = self._pending, None
        launched: tuple[list[Sequence], torch.Tensor, list[int]] | None = None
        assert pending is not None
        alive = [i for i, seq in enumerate(pending.seqs) if not seq.finished]
        seqs = [pending.seqs[i] for i in alive]
        if seqs and not self.scheduler.waiting and all([self.blocks.allocate(seq, 1) for seq in seqs]):
            tokens = pending.tokens if len(alive) == len(pending.seqs) else pending.tokens.index_select(
                0, upload(alive, pending.tokens.device, torch.long))
            logits, rows = self.runner.run([StepInput(seq, 1, [0]) for seq in seqs], self.blocks.take_new_blocks(),
                                           tokens=tokens)
            for seq in seqs:
                seq.num_computed += 1  # its input token reaches the host below, with the pending step's picks
            if any(seq.matcher is not None for seq in seqs):
                launched = (seqs, logits, rows)  # drawn below: the grammars need the pending step's tokens first
            else:
                ahead = self._launch_picks(seqs, _rows(logits, rows), rows, 1)
        if pending.done is not None:
            pending.done.synchronize()
        samples = _host_samples(pending.out, pending.seqs, pending.host)
        live = [(seq, sample) for seq, sample in zip(pending.seqs, samples) if not seq.finished]
        self._consume(live)  # finished or aborted after this step was launched: its row is dropped
        events: list[StreamEvent] = []
        for seq, sample in live:
            events.extend(self._emit(seq, sample))
            if not seq.finished:
                self.blocks.commit(seq)
        if launched is not None:  # the masks are filled while the launched step runs, then its draws
            seqs, logits, rows = launched
            keep = [i for i, seq in enumerate(seqs) if not seq.finished]
            if keep:
                ahead = self._launch_picks([seqs[i] for i in keep], _rows(logits, [rows[i] for i in keep]),
                                           [rows[i] for i in keep], 1)
        self._pending = ahead
        return events

    def _choose(self, ready: list[tuple[Sequence, int]], logits: torch.Tensor) -> list[Sample]:
        """The next token of each ready sequence: one batched draw on the device, one read back."""
        if not ready:
            return []
        seqs = [seq for seq, _ in ready]
        return _host_samples(self._draw(seqs, _rows(logits, [row for _, row in ready])), seqs)

    def _record_prompt_logprobs(self, seq: Sequence, start: int, logits: torch.Tensor) -> None:
        """Log-probabilities of the prompt tokens after positions start .. from the step's logits rows there
        (on the device: only the picked values, ranks and top-k come back)."""
        count = max(0, min(len(logits), seq.num_prompt - 1 - start))
        if count == 0:
            return
        logprobs = logits[:count].float().log_softmax(-1)
        targets = upload(seq.token_ids[start + 1 : start + 1 + count], logprobs.device, torch.long)
        chosen = logprobs.gather(1, targets[:, None])
        ranks = ((logprobs > chosen).sum(-1) + 1).tolist()  # vLLM's rank: 1 + the tokens more likely
        picked = chosen[:, 0].tolist()
        k = seq.params.prompt_logprobs or 0
        top = logprobs.topk(min(k, logprobs.shape[-1]), dim=-1) if k else None
        top_ids = top.indices.tolist() if top is not None else None
        top_values = top.values.tolist() if top is not None else None
        for i in range(count):
            entry = list(zip(top_ids[i], top_values[i])) if top is not None else []
            seq.prompt_logprobs[start + 1 + i] = (picked[i], entry)  # type: ignore[index]
            seq.prompt_ranks[start + 1 + i] = ranks[i]  # type: ignore[index]

    def _consume(self, drawn: list[tuple[Sequence, Sample]]) -> None:
        """The grammars of the constrained sequences take their drawn tokens, in parallel (llguidance)."""
        pairs = [(seq.matcher, sample.token) for seq, sample in drawn if seq.matcher is not None]
        if pairs:
            self.grammars.consume(pairs)

    def _finish_scored(self, seq: Sequence) -> list[StreamEvent]:
        """A prompt scored with nothing to generate: one last event with its log-probabilities."""
        seq.finish_reason = "length"
        event = StreamEvent(seq.request_id, None, "", None, "length", seq.index,
                            num_cached_tokens=seq.num_cached_tokens)
        event.prompt_logprobs, event.prompt_ranks = seq.prompt_logprobs, seq.prompt_ranks
        seq.prompt_logprobs_sent = True
        self._retire(seq)
        return [event]

    def _retire(self, seq: Sequence) -> None:
        """A finished sequence leaves the scheduler and the sampler; its request, once all its sequences are done."""
        self.scheduler.remove(seq)
        self._release(seq)
        if all(s.finished for s in self.requests.get(seq.request_id, [])):
            self.requests.pop(seq.request_id, None)

    def _emit(self, seq: Sequence, sample: Sample) -> list[StreamEvent]:
        """Append the chosen token; the stream events it makes (and the end of the sequence, if it ends)."""
        p = seq.params
        token = sample.token
        seq.token_ids.append(token)
        self.generation_tokens_total += 1
        event = StreamEvent(seq.request_id, token, "", sample.logprob, None, seq.index, sample.top,
                            num_cached_tokens=seq.num_cached_tokens)
        if seq.prompt_logprobs is not None and not seq.prompt_logprobs_sent:
            event.prompt_logprobs, seq.prompt_logprobs_sent = seq.prompt_logprobs, True
            event.prompt_ranks = seq.prompt_ranks
        may_stop = seq.num_output >= p.min_tokens
        # a grammar took the token (`_consume`); once complete (or broken), the output is done
        if seq.matcher is not None and (seq.matcher.is_stopped() or seq.matcher.is_error()):  # type: ignore
            if seq.detok is not None and token not in seq.eos_ids:
                event.text = seq.detok.add(seq.output_ids, check_stop=False)
            seq.finish_reason = "stop"
        elif may_stop and token in seq.eos_ids:
            seq.finish_reason = "stop"
        elif may_stop and token in p.stop_token_ids:  # its text is kept, as vLLM keeps it (a special token has none)
            if seq.detok is not None:
                event.text = seq.detok.add(seq.output_ids, check_stop=False)
            seq.finish_reason = "stop"
        elif seq.detok is not None:
            event.text = seq.detok.add(seq.output_ids, check_stop=may_stop)
            if seq.detok.stopped:
                seq.finish_reason = "stop"
        if seq.finish_reason is None and (seq.num_output >= p.max_tokens
                                          or seq.num_tokens >= self.config.max_model_len):
            seq.finish_reason = "length"
        if seq.finish_reason is None:
            return [event]
        flushed = seq.detok.flush() if seq.detok is not None and not seq.detok.stopped else ""
        self._retire(seq)
        return [event, StreamEvent(seq.request_id, None, flushed, None, seq.finish_reason, seq.index)]
