"""POST /v1/completions: text or token-id prompts (one or a batch), n completions each, streaming or not,
`echo` with `logprobs` (the prompt's own log-probabilities: what lm-evaluation-harness's local-completions
backend scores with; `max_tokens: 0` then returns the prompt alone).

Choice i * n + k is completion k of prompt i, as OpenAI numbers them.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from mistral7b.engine.outputs import StreamEvent
from mistral7b.errors import RequestError
from mistral7b.server.protocol import CompletionRequest
from mistral7b.server.state import ServerState, usage
from mistral7b.server.streaming import merged, respond, sse


@dataclass
class _Choice:
    """One completion as it streams in, with its logprobs in OpenAI's completions shape."""

    prompt_ids: list[int]
    keep_output: bool  # False for max_tokens 0: the one token generated is dropped
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    tokens: list[str] = field(default_factory=list)
    token_logprobs: list[float | None] = field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_logprobs: list[dict[str, dict[str, Any]] | None] | None = None  # vLLM's field, when asked for


def _prompt_logprobs(state: ServerState, ids: list[int], event: StreamEvent, k: int
                     ) -> list[dict[str, dict[str, Any]] | None]:
    """vLLM's completions `prompt_logprobs`: per prompt token (None for the first), the token itself and the k
    most likely, each {"logprob", "rank", "decoded_token"} under its id."""
    out: list[dict[str, dict[str, Any]] | None] = []
    ranks = event.prompt_ranks or [None] * len(ids)
    for i, entry in enumerate(event.prompt_logprobs or [None] * len(ids)):
        if entry is None:
            out.append(None)
            continue
        lp, top = entry
        texts = state.texts_after(ids[:i], [ids[i]] + [t for t, _ in top[:k]])
        row = {str(t): {"logprob": v, "rank": r + 1, "decoded_token": text}
               for r, ((t, v), text) in enumerate(zip(top[:k], texts[1:]))}
        row[str(ids[i])] = {"logprob": lp, "rank": ranks[i], "decoded_token": texts[0]}
        out.append(row)
    return out


def _echo_logprobs(state: ServerState, choice: _Choice, event: StreamEvent, k: int) -> None:
    ids = choice.prompt_ids
    texts = state.token_texts(ids)
    choice.tokens.extend(texts)
    for i, entry in enumerate(event.prompt_logprobs or [None] * len(ids)):
        if entry is None:
            choice.token_logprobs.append(None)
            choice.top_logprobs.append(None)
        else:
            lp, top = entry
            choice.token_logprobs.append(lp)
            choice.top_logprobs.append(dict(state.top_texts(ids[:i], top[:k])) | {texts[i]: lp})


async def create_completion(body: CompletionRequest, request: Request, state: ServerState) -> Any:
    state.check_model(body.model)
    body.check_stream_options()
    if body.suffix:
        raise RequestError("suffix is not supported")
    if body.best_of is not None and body.best_of != body.n:
        raise RequestError("best_of must equal n: this server does not rank candidates")
    max_tokens = 16 if body.max_tokens is None else body.max_tokens
    if max_tokens == 0 and not body.echo:
        raise RequestError("max_tokens must be at least 1 (0 is allowed only with echo)")
    for name in ("logprobs", "prompt_logprobs"):
        if (getattr(body, name) or 0) > state.max_logprobs:
            raise RequestError(f"{name} must be at most {state.max_logprobs}")
    prompt = body.prompt
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and isinstance(prompt[0], int)):
        prompt = [prompt]
    if not prompt:
        raise RequestError("prompt is empty")
    texts = [p if isinstance(p, str) else None for p in prompt]
    prompts = [await state.encode_prompt(p) for p in prompt]
    logprobs = body.logprobs is not None
    wanted = [k for k in (body.logprobs if body.echo and logprobs else None, body.prompt_logprobs) if k is not None]
    params = body.sampling_params(max(max_tokens, 1), state.sampling_defaults, logprobs=logprobs,
                                  top_logprobs=body.logprobs or 0, prompt_logprobs=max(wanted) if wanted else None)
    for ids in prompts:  # refuse the whole batch before any of it starts
        state.processor.check(ids, params)
    streams = [state.engine.submit(ids, params) for ids in prompts]
    rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    choices = [_Choice(ids, keep_output=max_tokens > 0) for ids in prompts for _ in range(body.n)]
    for i, text in enumerate(texts):
        if body.echo:
            for k in range(body.n):
                shown = text if text is not None else state.processor.tokenizer.decode(prompts[i])
                choices[i * body.n + k].text = shown

    def apply(i: int, event: StreamEvent) -> tuple[int, str]:
        """Fold an event into its choice; return the choice index and the text it adds."""
        index = i * body.n + event.index
        choice = choices[index]
        if event.prompt_logprobs is not None:
            if body.echo and logprobs:
                _echo_logprobs(state, choice, event, body.logprobs or 0)
            if body.prompt_logprobs is not None:
                choice.prompt_logprobs = _prompt_logprobs(state, choice.prompt_ids, event, body.prompt_logprobs)
        if event.finish_reason is not None:
            choice.finish_reason = event.finish_reason
        if not choice.keep_output:
            return index, ""
        if event.token_id is not None:
            context = choice.token_ids  # the completion's text is decoded from its own tokens: so are theirs
            if logprobs:
                text, top = state.sampled_texts(context, event.token_id, event.top_logprobs)
                choice.tokens.append(text)
                choice.token_logprobs.append(event.logprob)
                choice.top_logprobs.append(dict(top))
            choice.token_ids.append(event.token_id)
        choice.text += event.text
        return index, event.text

    def logprobs_of(choice: _Choice, start: int = 0) -> dict[str, Any] | None:
        if not logprobs:
            return None
        offsets, at = [], 0
        for t in choice.tokens:
            offsets.append(at)
            at += len(t)
        return {"tokens": choice.tokens[start:], "token_logprobs": choice.token_logprobs[start:],
                "top_logprobs": choice.top_logprobs[start:], "text_offset": offsets[start:]}

    def completion_tokens() -> int:
        return sum(len(c.token_ids) for c in choices)

    prompt_tokens = sum(len(ids) for ids in prompts)
    head = {"id": rid, "object": "text_completion", "created": created, "model": state.served_name}

    async def collect() -> dict[str, Any]:
        async for i, batch in merged(streams):
            for event in batch:
                apply(i, event)
        return {**head, "choices": [
            {"index": j, "text": c.text, "logprobs": logprobs_of(c), "finish_reason": c.finish_reason,
             **({"prompt_logprobs": c.prompt_logprobs} if body.prompt_logprobs is not None else {})}
            for j, c in enumerate(choices)], "usage": usage(prompt_tokens, completion_tokens())}

    async def chunks() -> AsyncIterator[str]:
        sent_tokens = [0] * len(choices)
        if body.echo and not logprobs:
            for j, c in enumerate(choices):  # the prompt first, as its own chunk per choice
                yield sse({**head, "choices": [{"index": j, "text": c.text, "logprobs": None, "finish_reason": None}],
                           "usage": None})
        async for i, batch in merged(streams):
            texts: dict[int, str] = {}  # choice -> the text this batch adds (one chunk per choice and batch)
            reasons: dict[int, str | None] = {}
            echoed: set[int] = set()
            prompted: set[int] = set()  # choices whose prompt_logprobs arrived in this batch (sent once)
            for event in batch:
                j, text = apply(i, event)
                texts[j] = texts.get(j, "") + text
                reasons[j] = event.finish_reason or reasons.get(j)
                if body.echo and logprobs and event.prompt_logprobs is not None:
                    echoed.add(j)
                if body.prompt_logprobs is not None and event.prompt_logprobs is not None:
                    prompted.add(j)
            for j, text in texts.items():
                c = choices[j]
                if (not text and reasons[j] is None and j not in prompted
                        and not (logprobs and len(c.tokens) > sent_tokens[j])):
                    continue
                chunk_logprobs = logprobs_of(c, sent_tokens[j])
                sent_tokens[j] = len(c.tokens)
                if j in echoed:  # the prompt's text with its logprobs, then what followed it
                    text = c.text
                extra = {"prompt_logprobs": c.prompt_logprobs} if j in prompted else {}
                yield sse({**head, "choices": [{"index": j, "text": text, "logprobs": chunk_logprobs,
                                                "finish_reason": reasons[j], **extra}], "usage": None})
        if body.include_usage:
            yield sse({**head, "choices": [], "usage": usage(prompt_tokens, completion_tokens())})

    return await respond(request, body.stream, chunks, collect, streams)
