"""The engine thread's failure modes, in process: a failing step turns every request and /health into 503s
(never a hang), and a request whose stream is dropped unread is aborted."""

from __future__ import annotations

import asyncio
import gc
import threading

import pytest

from mistral7b.engine.llm_engine import EngineConfig, LLMEngine
from mistral7b.engine.sampling_params import SamplingParams
from mistral7b.server.async_engine import AsyncEngine
from mistral7b.server.errors import APIError
from tests.conftest import random_model, tiny_args


@pytest.fixture
def engine():
    return LLMEngine(random_model(tiny_args(window=8), seed=1), None, EngineConfig(max_model_len=256))


def run_with(async_engine: AsyncEngine, main) -> object:
    """Run the engine loop in a thread and `main()` in an event loop; stop the engine afterwards."""

    async def runner():
        async_engine.attach(asyncio.get_running_loop())
        thread = threading.Thread(target=async_engine.run)
        thread.start()
        try:
            return await asyncio.wait_for(main(), timeout=30)
        finally:
            async_engine.stop()
            thread.join(timeout=30)

    return asyncio.run(runner())


def test_a_failing_step_fails_every_request_with_503(engine, monkeypatch):
    def broken_step():
        raise RuntimeError("out of memory in a kernel")

    monkeypatch.setattr(engine, "step", broken_step)
    ae = AsyncEngine(engine, max_waiting=8)

    async def main():
        stream = ae.submit([1, 2, 3], SamplingParams(max_tokens=4))
        with pytest.raises(APIError) as err:
            async for _ in stream:
                pass
        return err.value

    error = run_with(ae, main)
    assert error.status == 503 and "restarted" in error.message and "memory" not in error.message
    assert not ae.alive
    with pytest.raises(APIError) as again:
        ae.submit([1, 2, 3], SamplingParams(max_tokens=4))
    assert again.value.status == 503


def test_a_stream_dropped_unread_is_aborted(engine):
    ae = AsyncEngine(engine, max_waiting=8)

    async def main():
        stream = ae.submit([1, 2, 3], SamplingParams(max_tokens=200, ignore_eos=True))
        del stream  # a response that never started: nothing will ever read it
        gc.collect()
        for _ in range(300):
            await asyncio.sleep(0.01)
            if not engine.has_unfinished() and ae.num_requests == 0:
                return True
        return False

    assert run_with(ae, main)
    assert engine.blocks.usage == 0.0 and not engine.requests
    assert engine.generation_tokens_total < 200  # stopped early, not run to its end


def test_a_consumer_behind_the_engine_gets_its_events_in_batches(engine):
    """A stream read late yields what is queued as one batch (one chunk for a route to send), the same events
    in the same order as a stream read as they come; an error queued behind events comes after them."""
    ae = AsyncEngine(engine, max_waiting=8)
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

    eager, batches, seen = run_with(ae, main)
    assert len(eager) == 13 and eager[-1].finish_reason == "length"  # 12 tokens, then the finish event
    assert len(batches) == 1
    strip = lambda events: [(e.token_id, e.text, e.finish_reason) for e in events]  # noqa: E731
    assert strip(batches[0]) == strip(eager)
    assert len(seen) >= 3 and all(e.token_id is not None for e in seen)
