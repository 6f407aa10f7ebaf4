"""EngineCore: the engine's loop in the engine's process, fed by the API server's process over a Connection
(server/messages.py for what travels; server/async_engine.py for the other end).

The engine is synchronous and single-threaded, and only this loop touches it: between two steps it applies the
messages that arrived (requests, aborts, calls), then runs one step and sends that step's events in one
message, with the engine's gauges. With nothing to do it sleeps in `poll` until a message comes. The HTTP work
(JSON, server-sent events, the event loop) runs in the other process, so it no longer takes the interpreter lock
from this loop: at 256 streams it had cost half of a GPU's throughput (bench/README.md).

The loop runs in the thread that loaded the model: PyTorch's CPU thread pool belongs to the thread that first
used it, and its workers keep spinning, so a second thread computing beside it runs at well under half speed
(measured: 32 ms instead of 13 ms a decode step).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from mistral7b.engine.llm_engine import LLMEngine
from mistral7b.engine.outputs import EngineStats
from mistral7b.server import pauses
from mistral7b.server.messages import (AbortRequest, AddRequest, Call, CallResult, EngineDied, ErrorInfo,
                                       RequestFailed, Shutdown, StepOutput)

log = logging.getLogger("mistral7b.server")


class EngineCore:
    def __init__(self, engine: LLMEngine, conn: Connection,
                 operations: dict[str, Callable[..., Any]] | None = None):
        """`operations`: what the API side may `Call` by name (moderation: server/runner.py)."""
        self.engine, self.conn, self.operations = engine, conn, operations or {}
        self.error: BaseException | None = None
        pauses.install()
        self.retries = pauses.AllocRetries(engine.runner.device)

    def _stats(self) -> EngineStats:
        """The engine's gauges, with what could have stalled it: its process's GC pauses, allocator retries."""
        return dataclasses.replace(self.engine.stats(), gc_seconds=pauses.gc_seconds(),
                                   cuda_alloc_retries=self.retries.read())

    def run(self) -> None:
        """Serve until a `Shutdown` or until the API side closes its end (its process ended). A failing step
        ends the loop too: the API side is told (`EngineDied`), the exception is kept in `error`."""
        engine = self.engine
        try:
            while True:
                received = self.conn.poll(0 if engine.has_unfinished() else None)
                if received and not self._receive():
                    break
                if engine.has_unfinished():
                    self._send(StepOutput(engine.step(), self._stats()))
                elif received:  # no step (the last request aborted, a call): the gauges still move
                    self._send(StepOutput([], self._stats()))
        except (EOFError, BrokenPipeError, ConnectionResetError):  # the API process is gone: nothing to serve
            log.info("the API server's process closed its connection; the engine stops")
        except Exception as e:  # noqa: BLE001 - the failure is reported to every request and to /health
            log.exception("the engine failed")
            self.error = e
            try:
                self._send(EngineDied())
            except OSError:
                pass
        finally:
            for rid in list(engine.requests):
                engine.abort_request(rid)

    def _send(self, message: Any) -> None:
        self.conn.send(message)

    def _receive(self) -> bool:
        """Apply every message that has arrived; False once one says to shut down."""
        while True:
            message = self.conn.recv()
            if isinstance(message, Shutdown):
                return False
            self._apply(message)
            if not self.conn.poll(0):
                return True

    def _apply(self, message: Any) -> None:
        engine = self.engine
        if isinstance(message, AbortRequest):
            engine.abort_request(message.request_id)
        elif isinstance(message, AddRequest):
            try:
                engine.add_request(message.request_id, message.prompt_ids, message.params, message.arrival)
            except Exception as e:  # noqa: BLE001 - e.g. a RequestError: it belongs to that request only
                self._send(RequestFailed(message.request_id, ErrorInfo.of(e)))
        elif isinstance(message, Call):
            self._send(self._call(message))
        else:
            log.error("the engine got a message it does not know: %r", type(message).__name__)

    def _call(self, call: Call) -> CallResult:
        operation = self.operations.get(call.op)
        if operation is None:
            return CallResult(call.call_id, error=ErrorInfo(500, f"no operation {call.op!r}", "server_error"))
        try:
            return CallResult(call.call_id, operation(*call.args))
        except Exception as e:  # noqa: BLE001 - handed to the caller
            return CallResult(call.call_id, error=ErrorInfo.of(e))

