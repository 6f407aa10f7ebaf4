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
