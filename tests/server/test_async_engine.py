"""The async engine and the engine core, connected as in a server but in one process (the core in a thread):
a failing step turns every request and /health into 503s (never a hang), a request whose stream is dropped
unread is aborted, late readers get batches, shutdown and calls travel over the connection."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import multiprocessing
import threading

import pytest

from mistral7b.engine.llm_engine import EngineConfig, LLMEngine
from mistral7b.engine.sampling_params import SamplingParams
from mistral7b.errors import RequestError
from mistral7b.server.async_engine import AsyncEngine
from mistral7b.server.engine_core import EngineCore
from mistral7b.server.errors import APIError
from tests.conftest import random_model, tiny_args


@pytest.fixture
def engine():
    return LLMEngine(random_model(tiny_args(window=8), seed=1), None, EngineConfig(max_model_len=256))


def connect(engine: LLMEngine, operations=None, **kw) -> tuple[AsyncEngine, EngineCore]:
    """An async engine and an engine core at the two ends of one connection, as the server's two processes."""
    here, there = multiprocessing.Pipe(duplex=True)
    return AsyncEngine(here, engine.limits, kw.pop("max_waiting", 8), **kw), EngineCore(engine, there, operations)


def run_with(pair: tuple[AsyncEngine, EngineCore], main) -> object:
    """Run the engine core in a thread and `main()` in an event loop; stop the engine afterwards (the core's
    loop must end: a hang fails the test)."""
    async_engine, core = pair

    async def runner():
        async_engine.attach(asyncio.get_running_loop())
        thread = threading.Thread(target=core.run)
        thread.start()
        try:
            return await asyncio.wait_for(main(), timeout=30)
        finally:
            async_engine.stop()
            await asyncio.to_thread(thread.join, 30)
            assert not thread.is_alive()

    return asyncio.run(runner())


def test_a_failing_step_fails_every_request_with_503(engine, monkeypatch):
    def broken_step():
        raise RuntimeError("out of memory in a kernel")

    monkeypatch.setattr(engine, "step", broken_step)
    pair = ae, core = connect(engine)

    async def main():
        stream = ae.submit([1, 2, 3], SamplingParams(max_tokens=4))
        with pytest.raises(APIError) as err:
            async for _ in stream:
                pass
        return err.value

    error = run_with(pair, main)
    assert isinstance(core.error, RuntimeError)
    assert error.status == 503 and "restarted" in error.message and "memory" not in error.message
    assert not ae.alive
    with pytest.raises(APIError) as again:
        ae.submit([1, 2, 3], SamplingParams(max_tokens=4))
    assert again.value.status == 503


def test_a_stream_dropped_unread_is_aborted(engine):
    pair = ae, _ = connect(engine)

    async def main():
        stream = ae.submit([1, 2, 3], SamplingParams(max_tokens=200, ignore_eos=True))
        del stream  # a response that never started: nothing will ever read it
        gc.collect()
        for _ in range(300):
            await asyncio.sleep(0.01)
            # the gauges the API side reports follow the abort, though no step comes after it
            engine_gauges = dataclasses.replace(ae.stats, gc_seconds=0.0, cuda_alloc_retries=0)  # the core adds these
            if not engine.has_unfinished() and ae.num_requests == 0 and engine_gauges == engine.stats():
                return ae.stats.num_running == 0 and ae.stats.kv_cache_usage == 0.0
        return False

    assert run_with(pair, main)
    assert engine.blocks.usage == 0.0 and not engine.requests
    assert engine.generation_tokens_total < 200  # stopped early, not run to its end


def test_a_consumer_behind_the_engine_gets_its_events_in_batches(engine):
    """A stream read late yields what is queued as one batch (one chunk for a route to send), the same events
    in the same order as a stream read as they come; an error queued behind events comes after them."""
    pair = ae, _ = connect(engine)
    params = SamplingParams(max_tokens=12, ignore_eos=True, temperature=0)

    async def main():
        prompt = [1, 5, 9, 14]
        eager = [e async for e in ae.submit(prompt, params)]
        late = ae.submit(prompt, params)
        while late._stream.queue.qsize() < len(eager):  # every event queued: the request has finished
            await asyncio.sleep(0.01)
        batches = [b async for b in late.batches()]
        failing = ae.submit(prompt, SamplingParams(max_tokens=50, ignore_eos=True))
        while failing._stream.queue.qsize() < 3:
            await asyncio.sleep(0.001)
        ae._fail(failing._rid, APIError(503, "gone", "unavailable_error"))
        seen = []
        with pytest.raises(APIError):
            async for batch in failing.batches():
                seen.extend(batch)
        return eager, batches, seen

    eager, batches, seen = run_with(pair, main)
    assert len(eager) == 13 and eager[-1].finish_reason == "length"  # 12 tokens, then the finish event
    assert len(batches) == 1
    strip = lambda events: [(e.token_id, e.text, e.finish_reason) for e in events]  # noqa: E731
    assert strip(batches[0]) == strip(eager)
    assert len(seen) >= 3 and all(e.token_id is not None for e in seen)


def test_calls_run_in_the_engine_and_their_errors_come_back_as_api_errors(engine):
    seen_threads = []

    def echo(x, y):
        seen_threads.append(threading.current_thread().name)
        return {"sum": x + y}

    def refuse(text):
        raise RequestError(f"cannot moderate {text!r}")

    pair = ae, _ = connect(engine, {"echo": echo, "refuse": refuse})

    async def main():
        out = await ae.call("echo", 2, 3)
        errors = []
        for op, args in (("refuse", ("x",)), ("missing", ())):
            with pytest.raises(APIError) as err:
                await ae.call(op, *args)
            errors.append(err.value)
        return out, errors

    out, (refused, missing) = run_with(pair, main)
    assert out == {"sum": 5} and seen_threads and seen_threads[0] != threading.main_thread().name
    assert refused.status == 400 and refused.message == "cannot moderate 'x'"
    assert missing.status == 500 and "missing" in missing.message


def test_abort_all_ends_every_completion_once_and_frees_the_engine(engine):
    """Shutdown's deadline: each open completion gets one last event ("abort"), a finished one none."""
    pair = ae, _ = connect(engine)

    async def main():
        long = ae.submit([1, 2, 3], SamplingParams(max_tokens=200, ignore_eos=True, n=2))
        short = ae.submit([4, 5], SamplingParams(max_tokens=1, ignore_eos=True))
        short_events = [e async for e in short]
        first = await long.__anext__()
        ae.abort_all_at(0.0)  # a deadline already past: now
        rest = [e async for e in long]
        for _ in range(300):
            if not engine.has_unfinished():
                break
            await asyncio.sleep(0.01)
        return short_events, [first] + rest

    short_events, long_events = run_with(pair, main)
    assert [e.finish_reason for e in short_events] == [None, "length"]
    finals = [e for e in long_events if e.finish_reason is not None]
    assert sorted(e.index for e in finals) == [0, 1] and {e.finish_reason for e in finals} == {"abort"}
    assert not engine.requests and engine.blocks.usage == 0.0


def test_the_engine_gone_fails_requests_with_503_and_calls_on_dead(engine):
    """The engine's process dying (its end of the connection closed) ends every stream with a 503."""
    here, there = multiprocessing.Pipe(duplex=True)
    dead = []
    ae = AsyncEngine(here, engine.limits, 8, on_dead=lambda: dead.append(True))

    async def main():
        ae.attach(asyncio.get_running_loop())
        stream = ae.submit([1, 2, 3], SamplingParams(max_tokens=4))
        there.recv()  # the request arrived; then the "process" ends
        there.close()
        with pytest.raises(APIError) as err:
            async for _ in stream:
                pass
        return err.value

    error = asyncio.run(asyncio.wait_for(main(), timeout=30))
    assert error.status == 503 and dead == [True] and not ae.alive


def test_a_request_the_engine_refuses_fails_alone_and_the_gauges_follow(engine, monkeypatch):
    real_add = engine.add_request

    def add(rid, ids, params, arrival=None):
        if ids[0] == 7:
            raise RequestError("refused by the engine")
        return real_add(rid, ids, params, arrival)

    monkeypatch.setattr(engine, "add_request", add)
    pair = ae, _ = connect(engine)

    async def main():
        refused = ae.submit([7, 8], SamplingParams(max_tokens=2))
        with pytest.raises(APIError) as err:
            async for _ in refused:
                pass
        events = [e async for e in ae.submit([1, 2, 3], SamplingParams(max_tokens=3, ignore_eos=True))]
        for _ in range(300):  # the stats of the step after the last one arrive with it
            if ae.stats.num_running == 0:
                break
            await asyncio.sleep(0.01)
        return err.value, events

    error, events = run_with(pair, main)
    assert error.status == 400 and error.message == "refused by the engine"
    assert len(events) == 4 and ae.stats.num_running == 0 and ae.stats.prefix_cache_queries >= 3
