"""The server process's two threads: HTTP (uvicorn's event loop) in a thread of its own, and the engine in
the main thread, the one that loaded the model (see async_engine.py for why that matters).

SIGINT/SIGTERM ask uvicorn to shut down gracefully: it stops accepting connections and lets running requests
finish for `shutdown_timeout` seconds; what still runs shortly before that ends with finish_reason "abort" (a
last chunk and [DONE] for a stream), then the app's shutdown stops the engine loop. A second signal ends
every request at once the same way; a third stops waiting for connections.
"""

from __future__ import annotations

import signal
import threading
import time
from typing import Any

import uvicorn

from mistral7b.errors import Mistral7BError
from mistral7b.server.async_engine import AsyncEngine


def serve(app: Any, engine: AsyncEngine, host: str, port: int, log_level: str, shutdown_timeout: float) -> None:
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                           timeout_graceful_shutdown=shutdown_timeout))

    def http() -> None:
        try:
            server.run()
        finally:
            engine.stop()  # also when uvicorn could not start (port taken): the engine loop must end too

    signals = 0

    def on_signal(signum: int, frame: Any) -> None:
        nonlocal signals
        signals += 1
        if signals == 2:  # end now: every stream ends at once (a last chunk, [DONE]), so the connections close
            engine.abort_all_at(time.monotonic())  # and uvicorn's shutdown completes without cutting anything
        elif signals > 2:
            server.force_exit = True  # a client that does not read its last chunk no longer holds the exit
        server.should_exit = True
        # streams still running near the end of the grace period end with a last chunk ("abort") and [DONE]
        # before uvicorn would cut them
        engine.abort_all_at(time.monotonic() + max(0.0, shutdown_timeout - min(1.0, shutdown_timeout / 3)))

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    thread = threading.Thread(target=http, name="mistral7b-http")
    thread.start()
    try:
        engine.run()
    finally:
        server.should_exit = True
        thread.join()
        for s, handler in previous.items():
            signal.signal(s, handler)
    if not server.started:
        raise Mistral7BError(f"the server could not start on {host}:{port} (see the message above)")
    if engine.error is not None:
        raise Mistral7BError(f"the engine failed: {engine.error}")
