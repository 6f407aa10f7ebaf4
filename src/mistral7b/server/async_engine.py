"""AsyncEngine: the engine as the API server's event loop sees it: requests in, one event stream per request
out, over a Connection to the `EngineCore` (server/engine_core.py) that drives the engine in its own process
(a thread in tests).

Two threads move the messages (server/messages.py) so that the event loop never blocks on the connection: a
writer sends what the loop queued, a reader receives and hands each message to the loop in one
`call_soon_threadsafe`, where a step's events are routed to the per-request queues. A request whose consumer
goes away (client disconnect, cancellation) is aborted, which frees its blocks at the engine's next step.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from mistral7b.engine.outputs import EngineStats, StreamEvent
from mistral7b.engine.processor import PromptLimits
from mistral7b.engine.sampling_params import SamplingParams
from mistral7b.server.errors import APIError
from mistral7b.server.messages import (AbortRequest, AddRequest, Call, CallResult, EngineDied, RequestFailed,
                                       Shutdown, StepOutput)
from mistral7b.server.metrics import Metrics

log = logging.getLogger("mistral7b.server")


def _dead() -> APIError:
    return APIError(503, "the engine failed; the server must be restarted", "unavailable_error", code="engine_dead")


@dataclass
class _Stream:
    queue: asyncio.Queue
    arrival: float
    num_prompt: int
    n: int
    ended: set[int] = field(default_factory=set)  # completions whose last event is queued
    first_token: float | None = None
    last_token: dict[int, float] = field(default_factory=dict)


class AsyncEngine:
    def __init__(self, conn: Connection, limits: PromptLimits, max_waiting: int, metrics: Metrics | None = None,
                 on_dead: Callable[[], None] | None = None):
        """`on_dead()`: called on the event loop when the engine fails or its process goes away (the server
        shuts down then, as nothing can be served)."""
        self._conn, self.limits, self.max_waiting, self.metrics = conn, limits, max_waiting, metrics
        self.on_dead = on_dead
        self.stats = EngineStats()  # the engine's gauges, as of its last step
        self._streams: dict[str, _Stream] = {}
        self._calls: dict[int, asyncio.Future] = {}
        self._call_ids = itertools.count()
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = False
        self.dead = False

    # ---- lifecycle -----------------------------------------------------------------------------------
    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Deliver events to this event loop (the server's) and start moving messages; called when the app
        starts."""
        self._loop = loop
        threading.Thread(target=self._write, name="mistral7b-engine-writer", daemon=True).start()
        threading.Thread(target=self._read, name="mistral7b-engine-reader", daemon=True).start()

    def abort_all_at(self, deadline: float) -> None:
        """Graceful shutdown: every request still running at `deadline` (time.monotonic(), the event loop's
        clock) ends with a final event, finish_reason "abort", so that its response ends properly (a last
        chunk, then [DONE]) before the server's grace period runs out; signal-safe."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(
                    lambda: loop.call_later(max(0.0, deadline - time.monotonic()), self._abort_everything))
            except RuntimeError:  # the loop closed meanwhile
                pass

    def stop(self) -> None:
        """Abort whatever is left and tell the engine to shut down."""
        if self._stopping:
            return
        self._stopping = True
        for rid in list(self._streams):
            self._send(AbortRequest(rid))
        self._send(Shutdown())
        self._outbox.put(None)  # the writer ends after the shutdown

    @property
    def alive(self) -> bool:
        return not self.dead and not self._stopping

    @property
    def num_requests(self) -> int:
        return len(self._streams)

    # ---- requests ------------------------------------------------------------------------------------
    def submit(self, prompt_ids: list[int], params: SamplingParams) -> RequestStream:
        """Admit one request (all of its n completions) or raise the API error that refuses it (400 bad input,
        429 queue full, 503 engine down); iterate the result for its events."""
        if not self.alive:
            raise APIError(503, "the engine is not running", "unavailable_error", code="engine_dead")
        self.limits.check(prompt_ids, params)
        if len(self._streams) - self.stats.num_running >= self.max_waiting:
            raise APIError(429, f"the server is busy: {self.max_waiting} requests are already waiting; retry later",
                           "rate_limit_error", code="queue_full", retry_after=1)
        rid = uuid.uuid4().hex
        stream = _Stream(asyncio.Queue(), time.monotonic(), len(prompt_ids), params.n)
        self._streams[rid] = stream
        self._send(AddRequest(rid, list(prompt_ids), params, stream.arrival))
        if self.metrics is not None:
            self.metrics.request_added(len(prompt_ids))
        return RequestStream(self, rid, stream, params.n)

    def _close(self, rid: str, finished: bool) -> None:
        self._streams.pop(rid, None)
        if not finished and not self._stopping:
            self._send(AbortRequest(rid))

    async def call(self, op: str, *args: Any) -> Any:
        """Run the engine process's operation `op(*args)` between two steps (the model is never used by two
        threads at once): what moderation uses."""
        if not self.alive:
            raise APIError(503, "the engine is not running", "unavailable_error", code="engine_dead")
        call_id = next(self._call_ids)
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        self._calls[call_id] = future
        try:
            self._send(Call(call_id, op, args))
            return await future
        finally:
            self._calls.pop(call_id, None)

    def _send(self, message: Any) -> None:
        self._outbox.put(message)

    # ---- the connection's threads --------------------------------------------------------------------
    def _write(self) -> None:
        while (message := self._outbox.get()) is not None:
            try:
                self._conn.send(message)
            except OSError:  # the engine's process is gone; the reader reports it
                return

    def _read(self) -> None:
        while True:
            try:
                message = self._conn.recv()
            except (EOFError, OSError):
                self._post(self._lost)
                return
            self._post(self._dispatch, message)

    def _post(self, fn: Callable[..., Any], *args: Any) -> None:
        """fn(*args) on the event loop; nothing once the loop has closed (the HTTP side is gone at shutdown)."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # closed between the check and the call
            pass

    # ---- event loop side -----------------------------------------------------------------------------
    def _dispatch(self, message: Any) -> None:
        if isinstance(message, StepOutput):
            self.stats = message.stats
            if message.events:
                self._deliver(message.events)
        elif isinstance(message, RequestFailed):
            self._fail(message.request_id, message.error.error())
        elif isinstance(message, CallResult):
            future = self._calls.get(message.call_id)
            if future is not None and not future.done():  # else the caller went away
                if message.error is not None:
                    future.set_exception(message.error.error())
                else:
                    future.set_result(message.value)
        elif isinstance(message, EngineDied):
            self._die()

    def _lost(self) -> None:
        if not self._stopping:
            log.error("the engine's process ended unexpectedly")
            self._die()

    def _die(self) -> None:
        if self.dead:
            return
        self.dead = True
        error = _dead()
        for stream in self._streams.values():
            stream.queue.put_nowait(error)
        for future in self._calls.values():
            if not future.done():
                future.set_exception(error)
        if self.on_dead is not None:
            self.on_dead()

    def _deliver(self, events: list[StreamEvent]) -> None:
        now, tokens, metrics = time.monotonic(), 0, self.metrics
        for event in events:
            stream = self._streams.get(event.request_id)
            if stream is None:
                continue
            if event.token_id is not None and metrics is not None:
                tokens += 1
                if stream.first_token is None:
                    stream.first_token = now
                    metrics.first_token(now - stream.arrival)
                previous = stream.last_token.get(event.index)
                if previous is not None:
                    metrics.inter_token(now - previous)
                stream.last_token[event.index] = now
            if event.finish_reason is not None:
                stream.ended.add(event.index)
            stream.queue.put_nowait(event)
        if tokens:
            metrics.generated(tokens)

    def _fail(self, request_id: str, error: BaseException) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            stream.queue.put_nowait(error)

    def _abort_everything(self) -> None:
        """End every open stream now: a last event ("abort") for each completion not ended yet, and the
        engine told to drop them."""
        events = []
        for rid, stream in list(self._streams.items()):
            events += [StreamEvent(rid, None, "", None, "abort", k) for k in range(stream.n) if k not in stream.ended]
            self._send(AbortRequest(rid))
        self._deliver(events)


class RequestStream:
    """The events of one admitted request. `close()` (or garbage collection, if a response never started)
    aborts it unless it finished; the routes close their streams in `finally`."""

    def __init__(self, owner: AsyncEngine, rid: str, stream: _Stream, n: int):
        self._owner, self._rid, self._stream, self._left = owner, rid, stream, n
        self._closed = False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> StreamEvent:
        if not self._left:
            self.close()
            raise StopAsyncIteration
        return self._take(await self._stream.queue.get())

    async def batches(self) -> AsyncIterator[list[StreamEvent]]:
        """The events in batches: the next one and every one already queued behind it. A consumer that keeps
        up gets one event a batch; one that falls behind (many streams on one event loop) catches up in one
        chunk per batch instead of paying a wake-up, a JSON document and a socket write per token."""
        queue, error = self._stream.queue, None
        while self._left:
            batch = [self._take(error if error is not None else await queue.get())]
            while self._left and not queue.empty():
                item = queue.get_nowait()
                if isinstance(item, BaseException):  # raised at the next batch: what came before it goes first
                    error = item
                    break
                batch.append(self._take(item))
            yield batch
        self.close()

    def _take(self, event: StreamEvent | BaseException) -> StreamEvent:
        if isinstance(event, BaseException):
            self.close()
            raise event
        if event.finish_reason is not None:
            self._left -= 1
            metrics = self._owner.metrics
            if metrics is not None and not self._left:
                metrics.request_finished(time.monotonic() - self._stream.arrival, event.finish_reason)
        return event

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._owner._close(self._rid, finished=not self._left)

    def __del__(self) -> None:
        self.close()
