"""Continuous batching as clients see it: many concurrent streams, disconnects, metrics, shutdown."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import httpx
import pytest

from mistral7b import SamplingParams
from tests.server.conftest import API_KEY, MODEL, W, start_server

AUTH = {"Authorization": f"Bearer {API_KEY}"}


def wait_idle(server, timeout: float = 20.0) -> dict[str, float]:
    """Poll /metrics until no request runs or waits and no KV block is in use."""
    deadline = time.monotonic() + timeout
    while True:
        m = server.metrics()
        idle = (m["mistral7b:num_requests_running"] == 0 and m["mistral7b:num_requests_waiting"] == 0
                and m["mistral7b:kv_cache_usage_perc"] == 0)
        if idle or time.monotonic() > deadline:
            return m
        time.sleep(0.1)


def test_32_concurrent_streams_each_equal_its_offline_greedy_output(server, offline):
    words = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel"]
    # Lengths from a few tokens to well past 3W, a shared prefix for some (prefix cache), all at once.
    prompts = [" ".join(words[: 1 + i % 8]) * (1 + (i * 7) % (3 * W // 2)) for i in range(32)]
    max_tokens = [4 + (i * 5) % 23 for i in range(32)]
    refs = offline.generate(prompts, [SamplingParams(max_tokens=m, temperature=0) for m in max_tokens])

    async def one(client, prompt, m):
        stream = await client.completions.create(model=MODEL, prompt=prompt, max_tokens=m, temperature=0,
                                                 stream=True)
        parts = [chunk.choices[0].text async for chunk in stream if chunk.choices]
        return "".join(parts)

    async def main():
        client = server.async_client()
        return await asyncio.gather(*(one(client, p, m) for p, m in zip(prompts, max_tokens)))

    texts = asyncio.run(main())
    assert texts == [r.outputs[0].text for r in refs]
    assert wait_idle(server)["mistral7b:kv_cache_usage_perc"] == 0


def test_disconnect_mid_stream_frees_the_request(server):
    body = {"model": MODEL, "prompt": "Tell me a story", "max_tokens": 480, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=30) as client:
        with client.stream("POST", server.v1 + "/completions", json=body, headers=AUTH) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
    m = wait_idle(server)
    assert m["mistral7b:num_requests_running"] == 0 and m["mistral7b:num_requests_waiting"] == 0
    assert m["mistral7b:kv_cache_usage_perc"] == 0


def test_disconnect_of_a_waiting_non_streaming_request_frees_it(server):
    body = {"model": MODEL, "prompt": "Tell me a story", "max_tokens": 480, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.v1 + "/completions", json=body, headers=AUTH, timeout=0.2)
    m = wait_idle(server)
    assert m["mistral7b:kv_cache_usage_perc"] == 0 and m["mistral7b:num_requests_running"] == 0


def test_metrics_count_requests_and_tokens(tiny_model, tmp_path):
    s = start_server(tiny_model, str(tmp_path), "--max-model-len", "512")
    try:
        R, T = 5, 7
        client = s.client(api_key="unused")
        name = client.models.list().data[0].id
        for i in range(R):
            client.completions.create(model=name, prompt=f"Count {i}", max_tokens=T, temperature=0,
                                      extra_body={"ignore_eos": True})
        m = s.metrics()
        assert m["mistral7b:generation_tokens_total"] == R * T
        assert m["mistral7b:time_to_first_token_seconds_count"] == R
        assert m["mistral7b:inter_token_latency_seconds_count"] == R * (T - 1)
        assert m["mistral7b:e2e_request_latency_seconds_count"] == R
        assert m["mistral7b:prompt_tokens_total"] > 0
        # what could stall every stream: both processes' GC pauses (counted from the start), allocator retries
        assert m["mistral7b:engine_gc_pause_seconds_total"] >= 0 and m["mistral7b:api_gc_pause_seconds_total"] >= 0
        assert m["mistral7b:cuda_alloc_retries_total"] == 0  # a CPU server has no CUDA allocator
        text = httpx.get(s.url + "/metrics").text
        assert f'mistral7b:request_success_total{{finished_reason="length",model_name="{name}"}} 5.0' in text
        samples = [line for line in text.splitlines() if line.startswith("mistral7b:")]
        assert samples and all(f'model_name="{name}"' in line for line in samples)  # vLLM's label, everywhere
    finally:
        s.stop()


def test_sigterm_finishes_in_flight_work_then_exits(tiny_model, tmp_path):
    s = start_server(tiny_model, str(tmp_path), "--max-model-len", "512", "--shutdown-timeout", "20",
                     "--log-level", "info")
    body = {"prompt": "Hello", "max_tokens": 300, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=60) as client:
        with client.stream("POST", s.v1 + "/completions", json=body) as r:
            lines = r.iter_lines()
            next(lines)
            s.process.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line]
    assert rest[-1] == "data: [DONE]"
    assert '"finish_reason": "length"' in rest[-2] or '"finish_reason":"length"' in rest[-2]
    # uvicorn re-raises the signal once it has shut down cleanly, so the status says "ended by SIGTERM"
    assert s.process.wait(timeout=30) in (0, -signal.SIGTERM)
    assert "Application shutdown complete" in open(s.log).read() or s.process.returncode == 0


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stream_longer_than_the_grace_period_ends_cleanly(tmp_path, sig):
    """A signal while a stream has more to send than --shutdown-timeout allows: the stream ends with a final
    chunk (finish_reason "abort") and [DONE], and the process exits within the grace period with no traceback."""
    from tests.conftest import smollm2_path

    s = start_server(smollm2_path(), str(tmp_path), "--shutdown-timeout", "3", "--log-level", "info")
    body = {"prompt": "Once upon a time", "max_tokens": 3000, "ignore_eos": True, "stream": True}
    try:
        with httpx.Client(timeout=60) as client:
            with client.stream("POST", s.v1 + "/completions", json=body) as r:
                lines = r.iter_lines()
                for _ in range(3):
                    next(lines)
                sent = time.monotonic()
                s.process.send_signal(sig)
                rest = [line for line in lines if line]
        code = s.process.wait(timeout=30)
        took = time.monotonic() - sent
    finally:
        s.stop()
    log = open(s.log).read()
    assert rest and rest[-1] == "data: [DONE]", rest[-3:]
    assert '"finish_reason": "abort"' in rest[-2] or '"finish_reason":"abort"' in rest[-2], rest[-3:]
    assert code in (0, -sig), log[-3000:]
    assert took < 10 and "Traceback" not in log, log[-3000:]


def test_a_second_signal_during_the_grace_period_exits_at_once(tmp_path):
    """SIGTERM, then SIGTERM again while a long stream runs inside a long grace period: the process exits at once
    (not after the 30 s the period allows), with no traceback."""
    from tests.conftest import smollm2_path

    s = start_server(smollm2_path(), str(tmp_path), "--shutdown-timeout", "30", "--log-level", "info")
    body = {"prompt": "Once upon a time", "max_tokens": 3000, "ignore_eos": True, "stream": True}
    try:
        with httpx.Client(timeout=60) as client:
            with client.stream("POST", s.v1 + "/completions", json=body) as r:
                lines = r.iter_lines()
                next(lines)
                s.process.send_signal(signal.SIGTERM)
                time.sleep(0.5)
                sent = time.monotonic()
                s.process.send_signal(signal.SIGTERM)
                try:
                    for _ in lines:
                        pass
                except httpx.HTTPError:
                    pass  # the connection may be cut: the second signal ends everything
        code = s.process.wait(timeout=20)
        took = time.monotonic() - sent
    finally:
        s.stop()
    log = open(s.log).read()
    assert took < 10 and code in (0, -signal.SIGTERM), log[-3000:]
    assert "Traceback" not in log, log[-3000:]


def _api_process(pid: int) -> int:
    """The server's API process: the child of the engine's process that multiprocessing spawned for it (not
    its resource tracker)."""
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        children = [int(c) for c in f.read().split()]
    for child in children:
        with open(f"/proc/{child}/cmdline", "rb") as f:
            cmdline = f.read()
        if b"spawn_main" in cmdline and b"resource_tracker" not in cmdline:
            return child
    raise AssertionError(f"no API process among {children}")


def _gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split(") ")[-1].startswith("Z"):  # a zombie: ended, not reaped by its parent yet
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.1)
    return False


def test_the_two_processes_end_together(tiny_model, tmp_path):
    """HTTP runs in a process of its own: if it dies, the engine's process ends with a clear error (no
    traceback); if the engine's process dies, the API process stops serving and ends instead of answering
    requests nothing will run."""
    s = start_server(tiny_model, str(tmp_path), "--max-model-len", "512")
    try:
        os.kill(_api_process(s.process.pid), signal.SIGKILL)
        code = s.process.wait(timeout=60)
        log = open(s.log).read()
        assert code != 0 and "the API server's process ended" in log and "Traceback" not in log, log[-3000:]
    finally:
        s.stop()

    s = start_server(tiny_model, str(tmp_path), "--max-model-len", "512")
    try:
        api = _api_process(s.process.pid)
        s.process.kill()
        s.process.wait(timeout=30)
        assert _gone(api, timeout=30)
    finally:
        s.stop()


def test_a_port_in_use_is_one_clear_error(tiny_model, tmp_path):
    """uvicorn cannot bind in the API process: the server exits non-zero with one line saying so and no
    traceback."""
    import socket
    import subprocess
    import sys

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "mistral7b", "serve", "--model", tiny_model, "--port", str(port),
                               "--quiet", "--log-level", "warning"], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert f"error: the server could not start on 127.0.0.1:{port}" in done.stderr, done.stderr[-2000:]
    assert "Traceback" not in done.stderr + done.stdout, done.stderr[-2000:]
