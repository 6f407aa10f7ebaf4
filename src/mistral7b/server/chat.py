"""POST /v1/chat/completions: a conversation in the model's own chat format (Mistral: mistral-common; others:
their sandboxed template), n answers, streaming or not, logprobs with top_logprobs, Mistral's `safe_prompt`.

With `--moderate` the model checks itself (self-reflection, moderation/): a flagged prompt is answered with a
notice naming the category and finish_reason "content_filter"; with output moderation an answer is generated
in full and checked before any of it is sent (a stream then carries it in one piece, or the notice).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request

from mistral7b.engine.outputs import StreamEvent
from mistral7b.errors import RequestError
from mistral7b.server.protocol import ChatCompletionRequest
from mistral7b.server.state import ServerState, usage
from mistral7b.server.streaming import respond, sse


def _entry(text: str, logprob: float) -> dict[str, Any]:
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


async def create_chat_completion(body: ChatCompletionRequest, request: Request, state: ServerState) -> Any:
    state.check_model(body.model)
    body.check_stream_options()
    if body.tools:
        raise RequestError("tools are not supported by this server")
    if body.top_logprobs and not body.logprobs:
        raise RequestError("top_logprobs requires logprobs: true")
    if (body.top_logprobs or 0) > state.max_logprobs:
        raise RequestError(f"top_logprobs must be at most {state.max_logprobs}")
    messages = [m.plain() for m in body.messages]
    ids = await state.encode_chat(messages, body.safe_prompt)
    room = state.max_model_len - len(ids)
    max_tokens = body.max_completion_tokens or body.max_tokens or room
    if room < 1:
        raise RequestError(f"this model's maximum context length is {state.max_model_len} tokens; the messages "
                           f"take {len(ids)}")
    params = body.sampling_params(max_tokens, state.sampling_defaults, logprobs=body.logprobs, top_logprobs=body.top_logprobs or 0)
    state.processor.check(ids, params)
    refusal = await state.engine.call("check_input", messages) if state.moderate_input else None
    hold = state.moderate_output
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    head = {"id": rid, "created": created, "model": state.served_name}
    n = body.n
    texts = [refusal or "" for _ in range(n)]
    reasons: list[str | None] = ["content_filter" if refusal else None] * n
    outputs: list[list[int]] = [[] for _ in range(n)]
    entries: list[list[dict[str, Any]]] = [[] for _ in range(n)]
    stream = None if refusal else state.engine.submit(ids, params)

    def apply(event: StreamEvent) -> dict[str, Any] | None:
        """Fold an event into its answer; return its logprobs entry when asked for."""
        k = event.index
        texts[k] += event.text
        if event.finish_reason is not None:
            reasons[k] = event.finish_reason
        if event.token_id is None:
            return None
        context = list(outputs[k])  # the answer's text is decoded from its own tokens: so are theirs
        outputs[k].append(event.token_id)
        if not body.logprobs:
            return None
        text, top = state.sampled_texts(context, event.token_id, event.top_logprobs)
        entry = _entry(text, event.logprob)
        entry["top_logprobs"] = [_entry(t, lp) for t, lp in top]
        entries[k].append(entry)
        return entry

    async def moderate_outputs() -> None:
        for k in range(n):
            notice = await state.engine.call("check_output", messages, texts[k])
            if notice:
                texts[k], reasons[k], entries[k] = notice, "content_filter", []

    def the_usage() -> dict[str, Any]:
        return usage(len(ids), sum(len(o) for o in outputs))

    async def collect() -> dict[str, Any]:
        if stream is not None:
            async for batch in stream.batches():
                for event in batch:
                    apply(event)
        if hold:
            await moderate_outputs()
        return {**head, "object": "chat.completion", "choices": [
            {"index": k, "message": {"role": "assistant", "content": texts[k]},
             "logprobs": {"content": entries[k]} if body.logprobs else None, "finish_reason": reasons[k]}
            for k in range(n)], "usage": the_usage()}

    def chunk(k: int, delta: dict[str, Any], logprobs: Any = None, reason: str | None = None) -> str:
        return sse({**head, "object": "chat.completion.chunk", "choices": [
            {"index": k, "delta": delta, "logprobs": logprobs, "finish_reason": reason}], "usage": None})

    async def chunks() -> AsyncIterator[str]:
        for k in range(n):
            yield chunk(k, {"role": "assistant", "content": ""})
        if stream is not None and not hold:
            async for batch in stream.batches():  # one chunk per answer and batch of events
                texts_now: dict[int, str] = {}
                entries_now: dict[int, list[dict[str, Any]]] = {}
                finished: dict[int, str] = {}
                for event in batch:
                    entry = apply(event)
                    texts_now[event.index] = texts_now.get(event.index, "") + event.text
                    if entry is not None:
                        entries_now.setdefault(event.index, []).append(entry)
                    if event.finish_reason is not None:
                        finished[event.index] = event.finish_reason
                for k, text in texts_now.items():
                    if text or k in entries_now:
                        yield chunk(k, {"content": text}, {"content": entries_now[k]} if k in entries_now else None)
                    if k in finished:
                        yield chunk(k, {}, None, finished[k])
        else:  # refused, or held back until the answers are checked: each answer in one piece
            await collect()
            for k in range(n):
                yield chunk(k, {"content": texts[k]}, {"content": entries[k]} if body.logprobs else None)
                yield chunk(k, {}, None, reasons[k])
        if body.include_usage:
            yield sse({**head, "object": "chat.completion.chunk", "choices": [], "usage": the_usage()})

    return await respond(request, body.stream, chunks, collect, [stream] if stream is not None else [])
