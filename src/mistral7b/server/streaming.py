"""Server-sent events, interleaving several requests' streams, and cancelling work whose client went away.

A streaming response is cancelled by Starlette when the client disconnects; the cancellation reaches the
engine streams' `finally`, which aborts the requests. A non-streaming request has no such hook, so
`cancel_on_disconnect` watches the connection while the result is computed.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from mistral7b.engine.outputs import StreamEvent
from mistral7b.server.async_engine import RequestStream
from mistral7b.server.errors import as_api_error

T = TypeVar("T")
_DONE = object()


def sse(data: Any) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False, allow_nan=False)}\n\n"


SSE_DONE = "data: [DONE]\n\n"


def sse_error(e: BaseException) -> str:
    """An error after the 200 header: a data event with an `error` key (the official client raises it)."""
    return sse(as_api_error(e).body())


async def merged(streams: list[RequestStream]) -> AsyncIterator[tuple[int, list[StreamEvent]]]:
    """Batches of events (RequestStream.batches) of several streams as they come, tagged with the stream's
    index."""
    if len(streams) == 1:
        async for batch in streams[0].batches():
            yield 0, batch
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, stream: RequestStream) -> None:
        try:
            async for batch in stream.batches():
                queue.put_nowait((i, batch))
            queue.put_nowait((i, _DONE))
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - re-raised by the consumer
            queue.put_nowait((i, e))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        left = len(tasks)
        while left:
            i, item = await queue.get()
            if item is _DONE:
                left -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def cancel_on_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it if the client disconnects first."""
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                task.cancel()
                return

    watcher = asyncio.ensure_future(watch())
    try:
        return await task
    finally:
        watcher.cancel()


async def respond(request: Request, stream: bool, chunks: Callable[[], AsyncIterator[str]],
                  collect: Callable[[], Awaitable[dict[str, Any]]], streams: Iterable[RequestStream]) -> Response:
    """The response of a generation route: SSE `chunks()` (an error event if they fail after the 200 header, then
    always `[DONE]`), or the JSON of `collect()`, cancelled if the client goes away. Either way the engine
    streams are closed at the end, which aborts whatever of them has not finished."""

    def close() -> None:
        for s in streams:
            s.close()

    async def events() -> AsyncIterator[str]:
        try:
            async for chunk in chunks():
                yield chunk
        except Exception as e:  # noqa: BLE001 - after the 200 header, errors travel as an SSE event
            yield sse_error(e)
        finally:
            close()
        yield SSE_DONE

    if stream:
        return StreamingResponse(events(), media_type="text/event-stream")
    try:
        return JSONResponse(await cancel_on_disconnect(request, collect()))
    finally:
        close()
