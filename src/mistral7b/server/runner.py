"""The server's two processes: the engine in the process that loaded the model (this one, `serve`), and HTTP
(uvicorn, the routes, tokenizing, detokenized logprob texts, JSON and server-sent events) in a process of its
own (`api_process`), as vLLM splits them. They talk over a socket pair (server/messages.py). In one process the
HTTP thread's Python work took the interpreter lock from the engine's loop: at 256 streams the server ran at
half the engine's speed (bench/README.md).

Signals: the API process runs in its own process group, so a terminal's Ctrl-C reaches only this process, which
passes every SIGINT/SIGTERM on to it. There they ask uvicorn to shut down gracefully: it stops accepting
connections and lets running requests finish for `shutdown_timeout` seconds; what still runs shortly before that
ends with finish_reason "abort" (a last chunk and [DONE] for a stream), then the app's shutdown stops the engine
loop here. A second signal ends every request at once the same way; a third stops waiting for connections. If
the engine fails, every request gets a 503 and both processes end; if either process dies, the other ends too.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

from mistral7b.engine.generation_config import NEUTRAL, SamplingDefaults
from mistral7b.engine.processor import PromptLimits
from mistral7b.errors import Mistral7BError
from mistral7b.server import pauses
from mistral7b.server.engine_core import EngineCore

if TYPE_CHECKING:
    from mistral7b.engine.llm import LLM
    from mistral7b.moderation.chat import ChatGuard

COULD_NOT_START = 3  # the API process's exit code when uvicorn could not bind


@dataclass
class ApiServerSpec:
    """Everything the API process needs, sent to it when it starts (it loads only the tokenizer)."""

    model_path: str
    limits: PromptLimits
    served_name: str
    host: str = "127.0.0.1"
    port: int = 8000
    log_level: str = "info"
    shutdown_timeout: float = 10.0
    api_key: str | None = None
    cors_origins: list[str] = field(default_factory=list)
    max_body_bytes: int = 8 << 20
    max_queue: int = 256
    max_logprobs: int = 20
    safe_prompt: bool = False
    sampling_defaults: SamplingDefaults = NEUTRAL
    moderate_input: bool = False
    moderate_output: bool = False


def core_operations(llm: LLM, guard: ChatGuard | None, served_name: str) -> dict[str, Callable[..., Any]]:
    """What the API process may ask of the model between two steps: the chat guard's checks and
    /v1/moderations (the classifier is built on first use; the guard's own when --moderate is on)."""
    from mistral7b.moderation.policy import moderation_response

    moderator = guard.moderator if guard is not None else None

    def moderate(body: Any) -> dict[str, Any]:
        nonlocal moderator
        if moderator is None:
            from mistral7b.moderation.classifier import Moderator

            moderator = Moderator(llm)
        return moderation_response(moderator, body, served_name)

    operations: dict[str, Callable[..., Any]] = {"moderate": moderate}
    if guard is not None:
        operations.update(check_input=guard.check_input, check_output=guard.check_output)
    return operations


def serve(llm: LLM, spec: ApiServerSpec, operations: dict[str, Callable[..., Any]]) -> None:
    """Start the API process, then run the engine loop here until the server shuts down."""
    context = multiprocessing.get_context("spawn")  # a fork would copy CUDA and the CPU thread pool's state
    here, there = context.Pipe(duplex=True)
    api = context.Process(target=api_process, args=(there, spec), name="mistral7b-api")
    api.start()
    there.close()

    def on_signal(signum: int, frame: Any) -> None:
        if api.pid is not None and api.exitcode is None:
            try:
                os.kill(api.pid, signum)
            except ProcessLookupError:
                pass

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    core = EngineCore(llm.engine, here, operations)
    llm.engine.grammars.warm()  # structured outputs' vocabulary, built while the API process starts
    try:
        core.run()
    finally:
        here.close()  # the API process sees the engine gone (if it is not already shutting down)
        api.join(timeout=spec.shutdown_timeout + 30)
        if api.exitcode is None:
            api.terminate()
            api.join(timeout=10)
        for s, handler in previous.items():
            signal.signal(s, handler)
    if api.exitcode == COULD_NOT_START:
        raise Mistral7BError(f"the server could not start on {spec.host}:{spec.port} (see the message above)")
    if core.error is not None:
        raise Mistral7BError(f"the engine failed: {core.error}")
    if api.exitcode not in (0, -signal.SIGTERM):
        raise Mistral7BError(f"the API server's process ended with exit code {api.exitcode}")


def api_process(conn: Connection, spec: ApiServerSpec) -> None:
    """The API process's main: the tokenizer, the app, uvicorn in a thread; signals counted here."""
    os.setpgrp()  # out of the terminal's group: Ctrl-C reaches the engine's process, which passes it on
    import uvicorn

    from mistral7b.engine.llm import checkpoint_tokenizer
    from mistral7b.engine.processor import Processor
    from mistral7b.loading import open_checkpoint
    from mistral7b.server.app import build_app
    from mistral7b.server.async_engine import AsyncEngine
    from mistral7b.server.metrics import Metrics
    from mistral7b.server.state import ServerState

    logging.basicConfig(level=spec.log_level.upper(), format="%(levelname)s: %(name)s: %(message)s")
    processor = Processor(checkpoint_tokenizer(open_checkpoint(spec.model_path)), spec.limits, spec.model_path)
    processor.grammars.warm()
    pauses.install()  # this process's GC pauses, reported in /metrics

    def on_dead() -> None:  # the engine failed or its process ended: nothing more can be served
        server.should_exit = True

    engine = AsyncEngine(conn, spec.limits, spec.max_queue, on_dead=on_dead)
    engine.metrics = Metrics(lambda: engine.stats, lambda: engine.num_requests, spec.served_name)
    state = ServerState(processor=processor, engine=engine, metrics=engine.metrics, served_name=spec.served_name,
                        api_key=spec.api_key, moderate_input=spec.moderate_input,
                        moderate_output=spec.moderate_output, max_logprobs=spec.max_logprobs,
                        safe_prompt=spec.safe_prompt, sampling_defaults=spec.sampling_defaults)
    app = build_app(state, cors_origins=spec.cors_origins, max_body_bytes=spec.max_body_bytes)
    server = uvicorn.Server(uvicorn.Config(app, host=spec.host, port=spec.port, log_level=spec.log_level,
                                           timeout_graceful_shutdown=spec.shutdown_timeout))
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
        timeout = spec.shutdown_timeout
        engine.abort_all_at(time.monotonic() + max(0.0, timeout - min(1.0, timeout / 3)))

    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, on_signal)
    thread = threading.Thread(target=server.run, name="mistral7b-http")
    thread.start()
    while thread.is_alive():  # joined in slices: signals are handled in this thread between them
        thread.join(timeout=0.5)
    engine.stop()  # also when uvicorn could not start (port taken): the engine loop must end too
    if not server.started:
        raise SystemExit(COULD_NOT_START)
