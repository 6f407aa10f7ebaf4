"""`LLM`: the small offline API, in the field's words (vLLM's): LLM(model=...).generate / .chat / .stream.

It owns the loaded model and tokenizer, turns prompts (text, token ids, chats) into ids with their checks,
and runs them through the generation loop in batches.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Sequence
from typing import Any, Union

import torch

from mistral7b.default_model import default_model_path
from mistral7b.engine.generate import generate_stream
from mistral7b.engine.outputs import CompletionOutput, RequestOutput, StreamEvent
from mistral7b.engine.sampling_params import SamplingParams
from mistral7b.engine.scoring import TokenScores, score_tokens
from mistral7b.errors import RequestError
from mistral7b.guardrails import with_safe_prompt
from mistral7b.runtime import tune_allocator
from mistral7b.loading import Checkpoint, open_checkpoint
from mistral7b.model.build import QUANTIZE_MODES, build_model, quantizes
from mistral7b.model.fuse import fuse_projections
from mistral7b.model.quantize import quantize_model
from mistral7b.tokenizer import Tokenizer, load_tokenizer, tokenizer_from_gguf

Prompt = Union[str, Sequence[int], dict]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_CHUNK_SIZE = 512
DEFAULT_MAX_BATCH_SIZE = 32


def checkpoint_tokenizer(checkpoint: Checkpoint) -> Tokenizer | None:
    """The tokenizer that ships with a checkpoint: GGUF metadata, or the files beside the weights."""
    if checkpoint.format == "gguf":
        return tokenizer_from_gguf(checkpoint.metadata)
    folder = checkpoint.path if os.path.isdir(checkpoint.path) else os.path.dirname(checkpoint.path)
    return load_tokenizer(folder)


def resolve_dtype(dtype: str | torch.dtype, device: torch.device, quantized: bool = False) -> torch.dtype:
    """"auto": bfloat16 on GPUs, and on CPUs with bf16 support for quantized models (the packed CPU kernels
    are fast only with bf16 activations); float32 otherwise (the exact reference path)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if device.type == "cuda" or (quantized and torch.backends.mkldnn.is_available()
                                     and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
            return torch.bfloat16
        return torch.float32
    try:
        return DTYPES[dtype]
    except KeyError:
        raise RequestError(f"dtype must be one of auto, {', '.join(DTYPES)}; got {dtype!r}") from None


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
    ):
        """`quantize`: "auto" keeps a GGUF file's own quantization (Q4_0/Q4_1 packed as int4, other quantized
        types as int8) and loads other formats in float; "int8"/"int4" quantize any checkpoint's weights;
        None loads every weight in `dtype` (the exact reference path). `threads`: CPU threads (default: torch's,
        one per physical core)."""
        if quantize not in QUANTIZE_MODES:
            raise RequestError(f"quantize must be one of none, auto, int8, int4; got {quantize!r}")
        if threads is not None:
            if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
                raise RequestError(f"threads must be a positive integer, got {threads!r}")
            torch.set_num_threads(threads)
        tune_allocator()
        self.model_path = model or default_model_path()
        self.device = torch.device(device)
        checkpoint = open_checkpoint(self.model_path, sliding_window=sliding_window)
        self.dtype = resolve_dtype(dtype, self.device, quantized=quantizes(checkpoint, quantize))
        self.args = checkpoint.args
        self.checkpoint_format = checkpoint.format
        self.tokenizer = checkpoint_tokenizer(checkpoint)
        load_quantized = None if lora is not None else quantize
        self.model = build_model(checkpoint, self.dtype, self.device, progress=progress, quantize=load_quantized)
        if lora is not None:  # a PEFT LoRA adapter folder, merged into the float weights, then quantized
            from mistral7b.finetune.lora import merge_adapter

            merge_adapter(self.model, lora)
            if quantize in ("int8", "int4"):
                quantize_model(self.model, quantize, self.dtype)
        fuse_projections(self.model)
        window = self.args.sliding_window
        if chunk_size is not None and (isinstance(chunk_size, bool) or chunk_size < 1):
            raise RequestError(f"chunk_size must be a positive integer, got {chunk_size!r}")
        self.chunk_size = chunk_size or (min(window, DEFAULT_CHUNK_SIZE) if window else DEFAULT_CHUNK_SIZE)
        self.max_model_len = max_model_len or self.args.max_seq_len or 32768
        self.max_batch_size = max_batch_size

    # ---- prompts -----------------------------------------------------------------------------------
    def encode_prompt(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                prompt = prompt["prompt_token_ids"]
            elif "prompt" in prompt:
                prompt = prompt["prompt"]
            else:
                raise RequestError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise RequestError(f"{self.model_path} has no tokenizer: give token ids instead of text")
            ids = self.tokenizer.encode(prompt, add_bos=self.tokenizer.add_bos)
        else:
            ids = list(prompt)
            for t in ids:
                if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < self.args.vocab_size:
                    raise RequestError(f"token id {t!r} is not in [0, {self.args.vocab_size})")
        if not ids:
            raise RequestError("the prompt is empty")
        return ids

    def encode_chat(self, messages: list[dict], safe_prompt: bool = False) -> list[int]:
        if self.tokenizer is None:
            raise RequestError(f"{self.model_path} has no tokenizer, so it cannot format a chat")
        if not isinstance(messages, list):
            raise RequestError("messages must be a list of {role, content} objects")
        return self.tokenizer.encode_chat(with_safe_prompt(messages, safe_prompt), add_generation_prompt=True)

    def _fit(self, ids: list[int], params: SamplingParams) -> SamplingParams:
        """Cap max_tokens to the context left; a prompt that does not fit at all is an error."""
        room = self.max_model_len - len(ids)
        if room < 1:
            raise RequestError(
                f"the prompt has {len(ids)} tokens, which leaves no room in the context of {self.max_model_len}"
            )
        return dataclasses.replace(params, max_tokens=min(params.max_tokens, room)) if params.max_tokens > room else params

    # ---- generation --------------------------------------------------------------------------------
    def stream_ids(self, batch: Sequence[list[int]], params: Sequence[SamplingParams]) -> Iterator[StreamEvent]:
        fitted = [self._fit(ids, p) for ids, p in zip(batch, params)]
        return generate_stream(self.model, self.tokenizer, batch, fitted, self.chunk_size)

    def stream(self, prompt: Prompt, params: SamplingParams | None = None) -> Iterator[StreamEvent]:
        """Stream one request: one event per token as it is made, then a final event with finish_reason."""
        return self.stream_ids([self.encode_prompt(prompt)], [params or SamplingParams()])

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

    def score(self, prompts: Sequence[Prompt]) -> list[TokenScores]:
        """Log-probability of every token of each prompt given the tokens before it (no generation)."""
        ids = [self.encode_prompt(p) for p in prompts]
        for seq in ids:
            if len(seq) > self.max_model_len:
                raise RequestError(f"a sequence of {len(seq)} tokens exceeds the context of {self.max_model_len}")
        out: list[TokenScores] = []
        for lo in range(0, len(ids), self.max_batch_size):
            out.extend(score_tokens(self.model, ids[lo : lo + self.max_batch_size], self.chunk_size))
        return out

    def _run(
        self, ids: list[list[int]], params: SamplingParams | Sequence[SamplingParams] | None, texts: list[Any]
    ) -> list[RequestOutput]:
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(ids)
        if len(params) != len(ids):
            raise RequestError(f"got {len(params)} SamplingParams for {len(ids)} prompts")
        results = [
            RequestOutput(i, texts[i], ids[i], [CompletionOutput(0, logprobs=[] if params[i].logprobs else None)])
            for i in range(len(ids))
        ]
        for lo in range(0, len(ids), self.max_batch_size):
            hi = min(lo + self.max_batch_size, len(ids))
            for ev in self.stream_ids(ids[lo:hi], params[lo:hi]):
                out = results[lo + ev.request_id].outputs[0]
                out.text += ev.text
                if ev.token_id is not None:
                    out.token_ids.append(ev.token_id)
                    if out.logprobs is not None:
                        out.logprobs.append(ev.logprob)
                if ev.finish_reason is not None:
                    out.finish_reason = ev.finish_reason
                    results[lo + ev.request_id].finished = True
        return results
