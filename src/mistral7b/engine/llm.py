"""`LLM`: the small offline API, in the field's words (vLLM's): LLM(model=...).generate / .chat / .stream.

It owns the loaded model, its tokenizer and an `LLMEngine` (the same engine the server drives), turns prompts
(text, token ids, chats) into ids with their checks, and steps the engine until its requests are done.
"""

from __future__ import annotations

import atexit
import collections
import itertools
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from mistral7b.default_model import default_model_path
from mistral7b.distributed.launch import WorkerSpec, end_torchrun_worker, run_worker, start_group, stop_group
from mistral7b.model.tensor_parallel import check_shardable
from mistral7b.engine.llm_engine import EngineConfig, LLMEngine, build_runner
from mistral7b.engine.outputs import PairScore, TokenScores, CompletionOutput, RequestOutput, StreamEvent
from mistral7b.engine.generation_config import sampling_defaults
from mistral7b.engine.processor import Processor, Prompt
from mistral7b.engine.scoring import fit_pair
from mistral7b.engine.sampling_params import SamplingParams
from mistral7b.errors import RequestError
from mistral7b.runtime import allocator_for_compute, tune_allocator
from mistral7b.loading import Checkpoint, open_checkpoint
from mistral7b.model.build import QUANTIZE_MODES, build_model
from mistral7b.model.fuse import fuse_projections
from mistral7b.model.quantize import quantize_model
from mistral7b.tokenizer import Tokenizer, load_tokenizer, tokenizer_from_gguf

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_CHUNK_SIZE = 512
DEFAULT_MAX_BATCH_SIZE = 32


def checkpoint_tokenizer(checkpoint: Checkpoint) -> Tokenizer | None:
    """The tokenizer that ships with a checkpoint: GGUF metadata, or the files beside the weights."""
    if checkpoint.format == "gguf":
        return tokenizer_from_gguf(checkpoint.metadata)
    folder = checkpoint.path if os.path.isdir(checkpoint.path) else os.path.dirname(checkpoint.path)
    return load_tokenizer(folder)


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """"auto": bfloat16 on GPUs, float32 on CPUs, chosen by measurement (bench/README.md): with the CPU
    extension's quantized kernels a 2-core AVX-512 BF16/AMX machine decodes the embedded model at 148 tok/s in
    float32 against 111 in bfloat16 (conversions at every op), and pre-fills at 3.1x llama.cpp's rate in
    float32 (MKL); an AVX2 CPU has no bfloat16 arithmetic at all. float32 is also the exact reference."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return DTYPES[dtype]
    except KeyError:
        raise RequestError(f"dtype must be one of auto, {', '.join(DTYPES)}; got {dtype!r}") from None


def resolve_device(device: str | torch.device) -> torch.device:
    """The torch device for a user's string, or one clear error (unknown name, no such GPU)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise RequestError(f"unknown device {device!r}: use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RequestError(f"device {device!r}: no CUDA GPU is visible to this PyTorch "
                               f"({torch.__version__}); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise RequestError(f"device {device!r}: only {torch.cuda.device_count()} CUDA GPU(s) are visible")
    elif dev.type != "cpu":
        raise RequestError(f"device {device!r} is not supported: use cpu, cuda or cuda:N")
    return dev


class LLM:
    def __init__(
        self,
        model: str | None = None,
        *,
        dtype: str | torch.dtype = "auto",
        device: str = "cpu",
        chunk_size: int | None = None,
        sliding_window: int | None | str = "keep",
        max_model_len: int | None = None,
        max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
        progress: bool = True,
        lora: str | None = None,
        quantize: str | None = "auto",
        threads: int | None = None,
        engine_options: dict[str, Any] | None = None,
        tensor_parallel_size: int = 1,
    ):
        """`quantize`: "auto" keeps a GGUF file's own quantization (Q4_0/Q4_1 packed as int4, other quantized
        types as int8) and loads other formats in float; "int8"/"int4" quantize any checkpoint's weights;
        None loads every weight in `dtype` (the exact reference path). `threads`: CPU threads (default: torch's,
        one per physical core). `engine_options`: more EngineConfig fields (block_size, kv_cache_memory,
        num_blocks, max_num_batched_tokens, enable_prefix_caching). `tensor_parallel_size`: shard the model
        over that many processes (distributed/): under torchrun, or started here; float weights only."""
        if quantize not in QUANTIZE_MODES:
            raise RequestError(f"quantize must be one of none, auto, int8, int4; got {quantize!r}")
        if threads is not None:
            if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
                raise RequestError(f"threads must be a positive integer, got {threads!r}")
            torch.set_num_threads(threads)
        tune_allocator()
        self.model_path = model or default_model_path()
        self.device = resolve_device(device)
        checkpoint = open_checkpoint(self.model_path, sliding_window=sliding_window)
        self._group = None
        if tensor_parallel_size != 1:
            check_shardable(checkpoint.args, tensor_parallel_size)
            if lora is not None or quantize in ("int8", "int4"):
                raise RequestError("tensor parallelism runs float weights: drop --lora / --quantize int8|int4 "
                                   "(merge an adapter first with `mistral7b merge`)")
            quantize = None
        self.dtype = resolve_dtype(dtype, self.device)
        self.args = checkpoint.args
        self.checkpoint_format = checkpoint.format
        self.tokenizer = checkpoint_tokenizer(checkpoint)
        self.sampling_defaults = sampling_defaults(checkpoint)
        load_quantized = None if lora is not None else quantize
        shard = None
        if tensor_parallel_size != 1:
            spec = WorkerSpec(self.model_path, sliding_window, self.dtype, self.device.type, threads,
                              build_runner=build_runner)
            self._group = start_group(tensor_parallel_size, spec)
            self.device, shard = self._group.device, self._group.shard
            if shard.rank != 0:  # a torchrun worker: serve the driver's steps, then end the process
                run_worker(self._group, spec)
                end_torchrun_worker(self._group)
            atexit.register(self.close)
        self.model = build_model(checkpoint, self.dtype, self.device, progress=progress, quantize=load_quantized,
                                 shard=shard)
        if lora is not None:  # a PEFT LoRA adapter folder, merged into the float weights, then quantized
            from mistral7b.loading.lora_adapter import merge_adapter

            merge_adapter(self.model, lora)
            if quantize in ("int8", "int4"):
                quantize_model(self.model, quantize, self.dtype)
        fuse_projections(self.model)
        window = self.args.sliding_window
        if chunk_size is not None and (isinstance(chunk_size, bool) or chunk_size < 1):
            raise RequestError(f"chunk_size must be a positive integer, got {chunk_size!r}")
        self.chunk_size = chunk_size or (min(window, DEFAULT_CHUNK_SIZE) if window else DEFAULT_CHUNK_SIZE)
        max_model_len = max_model_len or self.args.max_seq_len or 32768
        self.max_batch_size = max_batch_size
        self.engine = LLMEngine(self.model, self.tokenizer, EngineConfig(
            max_model_len=max_model_len, chunk_size=self.chunk_size, max_num_seqs=max_batch_size,
            **(engine_options or {})), channel=self._group.channel if self._group else None)
        self.processor = Processor(self.tokenizer, self.engine.limits, self.model_path)
        self._pending: dict[Any, collections.deque[StreamEvent]] = {}
        self._request_ids = itertools.count()
        allocator_for_compute()  # loaded: step buffers from the heap from now on (runtime.py)

    @property
    def max_model_len(self) -> int:
        """The context length: the engine's, as its processor checks it (one source of truth)."""
        return self.processor.max_model_len

    # ---- prompts -----------------------------------------------------------------------------------
    def encode_prompt(self, prompt: Prompt) -> list[int]:
        return self.processor.encode_prompt(prompt)

    def encode_chat(self, messages: list[dict], safe_prompt: bool = False) -> list[int]:
        return self.processor.encode_chat(messages, safe_prompt)

    # ---- generation --------------------------------------------------------------------------------
    def stream_ids(self, batch: Sequence[list[int]], params: Sequence[SamplingParams]) -> Iterator[StreamEvent]:
        """Run prompts (token ids) together through the engine; events carry the prompt's index in `batch` as
        request_id. Closing the iterator early aborts whatever is still running."""
        fitted = [self.processor.fit(ids, p) for ids, p in zip(batch, params)]
        for ids, p in zip(batch, fitted):
            self.engine.check_prompt(ids, p)
        rids = []
        try:
            for i, (ids, p) in enumerate(zip(batch, fitted)):
                rid = (next(self._request_ids), i)
                self.engine.add_request(rid, ids, p)
                rids.append(rid)
                self._pending[rid] = collections.deque()
            left = {rid: p.n for rid, p in zip(rids, fitted)}  # completions not finished yet
            while left:
                for rid in list(left):
                    queue = self._pending[rid]
                    while queue:
                        ev = queue.popleft()
                        if ev.finish_reason is not None:
                            left[rid] -= 1
                            if not left[rid]:
                                del left[rid]
                        ev.request_id = rid[1]
                        yield ev
                if left:
                    self._pump()
        finally:
            for rid in rids:
                self.engine.abort_request(rid)
                self._pending.pop(rid, None)

    def _pump(self) -> None:
        """One engine step; its events go to the queues of the streams that wait for them."""
        for ev in self.engine.step():
            queue = self._pending.get(ev.request_id)
            if queue is not None:
                queue.append(ev)

    def default_sampling_params(self, **fields: Any) -> SamplingParams:
        """SamplingParams with the model's sampling defaults (engine/generation_config.py: its own, else
        llama.cpp's) for what `fields` leave out; what requests get when they pass no params."""
        return SamplingParams(**{**self.sampling_defaults.fields(), **fields})

    def stream(self, prompt: Prompt, params: SamplingParams | None = None) -> Iterator[StreamEvent]:
        """Stream one request: one event per token as it is made, then a final event with finish_reason."""
        return self.stream_ids([self.encode_prompt(prompt)], [params or self.default_sampling_params()])

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        if isinstance(prompts, (str, dict)) or (
            isinstance(prompts, Sequence) and prompts and isinstance(prompts[0], int)
        ):
            prompts = [prompts]
        texts = [p if isinstance(p, str) else None for p in prompts]
        ids = [self.encode_prompt(p) for p in prompts]
        return self._run(ids, params, texts)

    def chat(
        self,
        messages: list[dict] | list[list[dict]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        safe_prompt: bool = False,
    ) -> RequestOutput | list[RequestOutput]:
        """Answer one conversation (a list of messages) or several (a list of such lists)."""
        many = isinstance(messages, list) and bool(messages) and isinstance(messages[0], list)
        conversations = messages if many else [messages]
        ids = [self.encode_chat(m, safe_prompt) for m in conversations]
        outs = self._run(ids, params, [None] * len(ids))
        return outs if many else outs[0]

    def close(self) -> None:
        """Stop the tensor-parallel workers (a no-op otherwise); the engine cannot run after this."""
        group, self._group = self._group, None
        if group is not None and group.shard.rank == 0:
            stop_group(group)

    def _single_process(self, what: str) -> None:
        if self._group is not None:
            raise RequestError(f"{what} runs on one process: start without --tensor-parallel-size")

    def score(self, prompts: Sequence[Prompt]) -> list[TokenScores]:
        """Log-probability of every token of each prompt given the tokens before it (no generation): scoring
        requests of the engine (max_tokens 0 with prompt_logprobs), batched with anything else it runs."""
        ids = [self.encode_prompt(p) for p in prompts]
        scored = self._score_ids(ids, [0] * len(ids))
        return [TokenScores(list(seq), [lp for lp, _ in s[1:]], [rank == 1 for _, rank in s[1:]])
                for seq, s in zip(ids, scored)]

    def score_pairs(self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], max_len: int | None = None,
                    progress: Callable[[int], None] | None = None) -> list[PairScore]:
        """log p(continuation | context) and greediness for each (context ids, continuation ids) pair, the
        context cut from the left so that both fit `max_len` + 1 tokens (lm-eval's rule: the last token is only
        predicted). Pairs of one context share its pre-fill through the prefix cache: the first of each context
        runs first, the others after it. `progress(n)`: n more pairs done."""
        max_len = min(max_len or self.max_model_len, self.max_model_len)
        fitted = []
        for ctx, cont in pairs:
            if not ctx:
                raise RequestError("a context must have at least one token (use BOS for an empty context)")
            fitted.append(fit_pair(list(ctx), list(cont), max_len))
        leaders: dict[tuple[int, ...], int] = {}
        for i, (ctx, _) in enumerate(fitted):
            leaders.setdefault(tuple(ctx), i)
        first = sorted(leaders.values())
        leading = set(first)
        rest = [i for i in range(len(fitted)) if i not in leading]
        results: list[PairScore | None] = [None] * len(fitted)
        for wave in (first, rest):
            if not wave:
                continue
            scored = self._score_ids([fitted[i][0] + fitted[i][1] for i in wave], [len(fitted[i][0]) for i in wave],
                                     progress)
            for i, s in zip(wave, scored):
                tail = s[len(fitted[i][0]):]
                results[i] = PairScore(sum(lp for lp, _ in tail), all(rank == 1 for _, rank in tail))
        return results  # type: ignore[return-value]

    def _score_ids(self, ids: list[list[int]], starts: list[int],
                   progress: Callable[[int], None] | None = None) -> list[list[tuple[float, int]]]:
        """(log-probability, rank) of every prompt token from `starts[i]` on (entries before it: (0.0, 1)),
        as engine requests that generate nothing."""
        out: list[list[tuple[float, int]]] = [[(0.0, 1)] * len(seq) for seq in ids]
        todo = [i for i, seq in enumerate(ids) if len(seq) > max(1, starts[i])]
        params = [SamplingParams(max_tokens=0, temperature=0.0, prompt_logprobs=0, prompt_logprobs_from=starts[i])
                  for i in todo]
        for ev in self.stream_ids([ids[i] for i in todo], params):
            if ev.finish_reason is None:
                continue
            i = todo[ev.request_id]
            lps, ranks = ev.prompt_logprobs or [], ev.prompt_ranks or []
            out[i] = [(entry[0], rank or 1) if entry is not None else (0.0, 1) for entry, rank in zip(lps, ranks)]
            if progress is not None:
                progress(1)
        return out

    def _run(
        self, ids: list[list[int]], params: SamplingParams | Sequence[SamplingParams] | None, texts: list[Any]
    ) -> list[RequestOutput]:
        if params is None or isinstance(params, SamplingParams):
            params = [params or self.default_sampling_params()] * len(ids)
        if len(params) != len(ids):
            raise RequestError(f"got {len(params)} SamplingParams for {len(ids)} prompts")
        results = []
        for i, p in enumerate(params):
            outputs = [CompletionOutput(k, logprobs=[] if p.logprobs else None,
                                        top_logprobs=[] if p.top_logprobs else None) for k in range(p.n)]
            results.append(RequestOutput(i, texts[i], ids[i], outputs))
        for ev in self.stream_ids(ids, params):
            result = results[ev.request_id]
            out = result.outputs[ev.index]
            out.text += ev.text
            if ev.token_id is not None:
                out.token_ids.append(ev.token_id)
                if out.logprobs is not None:
                    out.logprobs.append(ev.logprob)
                if out.top_logprobs is not None:
                    out.top_logprobs.append(ev.top_logprobs)
            if ev.prompt_logprobs is not None:
                result.prompt_logprobs = ev.prompt_logprobs
            if ev.token_id is not None and len(out.token_ids) == 1 and ev.index == 0:
                result.num_cached_tokens = ev.num_cached_tokens
            if ev.finish_reason is not None:
                out.finish_reason = ev.finish_reason
                result.finished = all(o.finish_reason is not None for o in result.outputs)
        return results
