"""AsyncEngine: the synchronous LLMEngine driven by one thread, streamed to asyncio requests.

The engine is not thread-safe, so only its thread touches it: requests and aborts are sent to it as commands,
and each step's events come back to the event loop in one `call_soon_threadsafe`, where they are routed to the
per-request queues. The engine thread sleeps while there is no work. A request whose consumer goes away
(client disconnect, cancellation) is aborted, which frees its blocks at the next step boundary.

The engine runs in the thread that loaded the model (`run`, from server/runner.py), and HTTP in another:
PyTorch's CPU thread pool belongs to the thread that first used it, and its workers keep spinning, so a second
thread computing beside it runs at well under half speed (measured: 32 ms instead of 13 ms a decode step).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from mistral7b.engine.llm_engine import LLMEngine
from mistral7b.engine.outputs import StreamEvent
from mistral7b.engine.sampling_params import SamplingParams
from mistral7b.server.errors import APIError
from mistral7b.server.metrics import Metrics

log = logging.getLogger("mistral7b.server")


T = TypeVar("T")


def _settle(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.done():  # the caller went away
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


@dataclass
class _Stream:
    queue: asyncio.Queue
    arrival: float
    num_prompt: int
    first_token: float | None = None
    last_token: dict[int, float] = field(default_factory=dict)


class AsyncEngine:
    def __init__(self, engine: LLMEngine, max_waiting: int, metrics: Metrics | None = None):
        self.engine, self.max_waiting, self.metrics = engine, max_waiting, metrics
        self._commands: collections.deque = collections.deque()
        self._wake = threading.Condition()
        self._streams: dict[str, _Stream] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = False
        self._abort_at: float | None = None  # graceful shutdown: what still runs then ends as "abort"
        self.error: BaseException | None = None

    # ---- lifecycle -----------------------------------------------------------------------------------
    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Deliver events to this event loop (the server's); called when the app starts."""
        self._loop = loop

    def run(self) -> None:
        """The engine loop, in the calling thread, until `stop()` (or a failure, kept in `error`)."""
        self._loop_forever()

    def abort_all_at(self, deadline: float) -> None:
        """Graceful shutdown: every request still running at `deadline` (time.monotonic()) ends with a final
        event, finish_reason "abort", so that its response ends properly (a last chunk, then [DONE]) before the
        server's grace period runs out; signal-safe (called from a signal handler)."""
        self._abort_at = deadline if self._abort_at is None else min(self._abort_at, deadline)

    def stop(self) -> None:
        """Abort whatever is left and end the engine loop."""
        for rid in list(self._streams):
            self._send(("abort", rid))
        with self._wake:
            self._stopping = True
            self._wake.notify()

    @property
    def alive(self) -> bool:
        return self.error is None and not self._stopping

    @property
    def num_requests(self) -> int:
        return len(self._streams)

    # ---- requests ------------------------------------------------------------------------------------
    def submit(self, prompt_ids: list[int], params: SamplingParams) -> RequestStream:
        """Admit one request (all of its n completions) or raise the API error that refuses it (400 bad input,
        429 queue full, 503 engine down); iterate the result for its events."""
        if not self.alive:
            raise APIError(503, "the engine is not running", "unavailable_error", code="engine_dead")
        self.engine.check_prompt(prompt_ids, params)
        if len(self._streams) - self.engine.num_running >= self.max_waiting:
            raise APIError(429, f"the server is busy: {self.max_waiting} requests are already waiting; retry later",
                           "rate_limit_error", code="queue_full", retry_after=1)
        rid = uuid.uuid4().hex
        stream = _Stream(asyncio.Queue(), time.monotonic(), len(prompt_ids))
        self._streams[rid] = stream
        self._send(("add", rid, prompt_ids, params, stream.arrival))
        if self.metrics is not None:
            self.metrics.request_added(len(prompt_ids))
        return RequestStream(self, rid, stream, params.n)

    def _close(self, rid: str, finished: bool) -> None:
        self._streams.pop(rid, None)
        if not finished:
            self._send(("abort", rid))

    async def call(self, fn: Callable[[], T]) -> T:
        """Run fn() on the engine thread between two steps (the model is never used by two threads at once):
        what moderation scoring uses."""
        if not self.alive:
            raise APIError(503, "the engine is not running", "unavailable_error", code="engine_dead")
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        self._send(("call", fn, future))
        return await future

    def _send(self, command: tuple) -> None:
        with self._wake:
            self._commands.append(command)
            self._wake.notify()

    # ---- event loop side -----------------------------------------------------------------------------
    def _deliver(self, events: list[StreamEvent]) -> None:
        now, tokens = time.monotonic(), 0
        for event in events:
            stream = self._streams.get(event.request_id)
            if stream is None:
                continue
            if event.token_id is not None and self.metrics is not None:
                tokens += 1
                if stream.first_token is None:
                    stream.first_token = now
                    self.metrics.first_token(now - stream.arrival)
                previous = stream.last_token.get(event.index)
                if previous is not None:
                    self.metrics.inter_token(now - previous)
                stream.last_token[event.index] = now
            stream.queue.put_nowait(event)
        if tokens:
            self.metrics.generated(tokens)

    def _fail(self, request_id: str, error: BaseException) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            stream.queue.put_nowait(error)

    def _fail_all(self, error: BaseException) -> None:
        for stream in self._streams.values():
            stream.queue.put_nowait(error)

    # ---- engine thread -------------------------------------------------------------------------------
    def _loop_forever(self) -> None:
        try:
            while True:
                with self._wake:
                    while not self._commands and not self._stopping and not self.engine.has_unfinished():
                        self._wake.wait(timeout=1.0)
                    if self._stopping:
                        break
                    commands = list(self._commands)
                    self._commands.clear()
                for command in commands:
                    self._apply(command)
                if self._abort_at is not None and time.monotonic() >= self._abort_at:
                    self._abort_everything()
                if self.engine.has_unfinished():
                    events = self.engine.step()
                    if events:
                        self._post(self._deliver, events)
        except Exception as e:  # noqa: BLE001 - the failure is reported to every request and to /health
            log.exception("the engine failed")
            self.error = e
            dead = APIError(503, "the engine failed; the server must be restarted", "unavailable_error",
                            code="engine_dead")
            self._post(self._fail_all, dead)
        finally:
            for rid in list(self.engine.requests):
                self.engine.abort_request(rid)

    def _post(self, fn: Callable[..., Any], *args: Any) -> None:
        """fn(*args) on the event loop; nothing once the loop has closed (the HTTP side is gone at shutdown)."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # closed between the check and the call
            pass

    def _abort_everything(self) -> None:
        events = []
        for rid, seqs in list(self.engine.requests.items()):
            events += [StreamEvent(rid, None, "", None, "abort", seq.index) for seq in seqs if not seq.finished]
            self.engine.abort_request(rid)
        if events:
            self._post(self._deliver, events)

    def _apply(self, command: tuple) -> None:
        assert self._loop is not None
        if command[0] == "abort":
            self.engine.abort_request(command[1])
            return
        if command[0] == "call":
            _, fn, future = command
            try:
                result = fn()
            except Exception as e:  # noqa: BLE001 - handed to the caller
                self._post(_settle, future, None, e)
            else:
                self._post(_settle, future, result, None)
            return
        _, rid, prompt_ids, params, arrival = command
        try:
            self.engine.add_request(rid, prompt_ids, params, arrival)
        except Exception as e:  # noqa: BLE001 - e.g. a RequestError: it belongs to that request only
            self._post(self._fail, rid, e)


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
