"""POST /v1/chat/completions: a conversation in the model's own chat format (Mistral: mistral-common; others:
their sandboxed template), n answers, streaming or not, logprobs with top_logprobs, Mistral's `safe_prompt`.

With `--moderate` the model checks itself (self-reflection, moderation/): a flagged prompt is answered with a
notice naming the category and finish_reason "content_filter"; with output moderation an answer is generated
in full and checked before any of it is sent (a stream then carries it in one piece, or the notice).
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request

from mistral7b.engine.outputs import StreamEvent
from mistral7b.engine.sampling_params import SamplingParams
from mistral7b.errors import RequestError
from mistral7b.server.protocol import ChatCompletionRequest
from mistral7b.server.state import ServerState, usage
from mistral7b.server.streaming import respond, sse
from mistral7b.server.tool_calls import ToolCall, Tools


def _entry(text: str, logprob: float) -> dict[str, Any]:
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


def with_tools(params: SamplingParams, tools: Tools) -> SamplingParams:
    """The request's sampling with its tool choice applied: a forced call's grammar, or the call token banned."""
    forced = tools.constraint()
    if forced is not None:
        if params.structured is not None:
            raise RequestError("tool_choice 'required' or a named function cannot be combined with response_format "
                               "or structured_outputs")
        params = dataclasses.replace(params, structured=forced)
    if tools.logit_bias():
        params = dataclasses.replace(params, logit_bias={**params.logit_bias, **tools.logit_bias()})
    return params


async def create_chat_completion(body: ChatCompletionRequest, request: Request, state: ServerState) -> Any:
    state.check_model(body.model)
    body.check_stream_options()
    if body.top_logprobs and not body.logprobs:
        raise RequestError("top_logprobs requires logprobs: true")
    if (body.top_logprobs or 0) > state.max_logprobs:
        raise RequestError(f"top_logprobs must be at most {state.max_logprobs}")
    tools = Tools.from_request(body.tool_list(), body.tool_choice_plain(), body.parallel_tool_calls,
                               state.processor.tokenizer)
    messages = [m.plain() for m in body.messages]
    ids = await state.encode_chat(messages, body.safe_prompt, tools.offered if tools is not None else None)
    room = state.max_model_len - len(ids)
    max_tokens = body.max_completion_tokens or body.max_tokens or room
    if room < 1:
        raise RequestError(f"this model's maximum context length is {state.max_model_len} tokens; the messages "
                           f"take {len(ids)}")
    params = body.sampling_params(max_tokens, state.sampling_defaults, logprobs=body.logprobs,
                                  top_logprobs=body.top_logprobs or 0)
    if tools is not None:
        params = with_tools(params, tools)
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

    def calls_of(k: int) -> list[ToolCall] | None:
        return tools.parse(outputs[k], texts[k]) if tools is not None and reasons[k] == "stop" else None

    def message(k: int) -> tuple[dict[str, Any], str | None]:
        calls = calls_of(k)
        if calls:
            return {"role": "assistant", "content": None, "tool_calls": [c.message() for c in calls]}, "tool_calls"
        return {"role": "assistant", "content": texts[k]}, reasons[k]

    async def collect() -> dict[str, Any]:
        if stream is not None:
            async for batch in stream.batches():
                for event in batch:
                    apply(event)
        if hold:
            await moderate_outputs()
        choices = []
        for k in range(n):
            msg, reason = message(k)
            choices.append({"index": k, "message": msg, "logprobs": {"content": entries[k]} if body.logprobs else None,
                            "finish_reason": reason})
        return {**head, "object": "chat.completion", "choices": choices, "usage": the_usage()}

    def tool_chunks(k: int) -> list[str]:
        """An answer that called tools, streamed as OpenAI streams calls: each call's id and name, then its
        arguments; or, where the answer did not parse as calls, its text."""
        calls = calls_of(k)
        if not calls:
            return [chunk(k, {"content": texts[k]}), chunk(k, {}, None, reasons[k])]
        out = []
        for i, c in enumerate(calls):
            out.append(chunk(k, {"tool_calls": [{"index": i, "id": c.id, "type": "function",
                                                 "function": {"name": c.name, "arguments": ""}}]}))
            out.append(chunk(k, {"tool_calls": [{"index": i, "function": {"arguments": c.arguments}}]}))
        return out + [chunk(k, {}, None, "tool_calls")]

    calling: list[bool | None] = [None] * n  # per answer: it began with the [TOOL_CALLS] token (then held)

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
                    if tools is not None and calling[k] is not False:
                        if calling[k] is None:
                            calling[k] = tools.starts(outputs[k], texts[k])
                        if calling[k] or (calling[k] is None and k not in finished):
                            if k in finished:  # a tool call is sent whole once it is complete
                                for piece in tool_chunks(k):
                                    yield piece
                            continue  # a call, or too early to tell: held
                        text = texts[k]  # no call: what was held comes out with this batch's text
                        if body.logprobs:
                            entries_now[k] = list(entries[k])
                        calling[k] = False
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
