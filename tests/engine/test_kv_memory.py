"""The KV cache's size on a GPU (engine/kv_memory.py): a share of the whole card, less what is in use and a
measured step. The arithmetic, its errors and the measured step's engine everywhere; the sizing on a real GPU."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from mistral7b.cache.paged import PagedKVCache
from mistral7b.engine import kv_memory
from mistral7b.engine.kv_memory import GIB, GRAPH_RESERVE, kv_bytes
from mistral7b.engine.llm_engine import EngineConfig, LLMEngine
from mistral7b.engine.sampling_params import SamplingParams
from mistral7b.errors import RequestError
from tests.conftest import engine_generate, random_model, tiny_args


def probe(model, config) -> LLMEngine:
    """The throwaway engine the measurement builds (the engine hands in its own constructor)."""
    return LLMEngine(model, None, config)


def test_the_cache_gets_the_share_left_after_what_is_in_use_and_a_step():
    # an 80 GiB card, 15 GiB in use after loading, a step of 2 GiB: 0.9 * 80 - 15 - 2 - the graphs' reserve
    got = kv_bytes(80 * GIB, 65 * GIB, 2 * GIB, 0.9)
    assert got == int(0.9 * 80 * GIB) - 15 * GIB - 2 * GIB - GRAPH_RESERVE
    assert kv_bytes(80 * GIB, 65 * GIB, 2 * GIB, 0.5) < got  # a smaller share, a smaller cache


def test_nothing_left_is_one_error_naming_the_flag_and_the_parts():
    with pytest.raises(RequestError) as e:
        kv_bytes(80 * GIB, 20 * GIB, 4 * GIB, 0.8)  # 60 GiB in use of the 64 allowed, a step of 4
    message = str(e.value)
    assert "--gpu-memory-utilization 0.8" in message and "60.0 GiB are in use" in message and "4.00 GiB" in message


@pytest.mark.parametrize("value", [0, 1.5, -0.1, True, "0.9"])
def test_the_utilization_must_be_a_share(value):
    with pytest.raises(RequestError, match="gpu_memory_utilization"):
        EngineConfig(max_model_len=64, gpu_memory_utilization=value).validate()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_the_measured_step_and_the_share_size_the_cache():
    """A real step's peak is measured (positive, and below what a step of this tiny model could need); a share that
    leaves 256 MiB past what is in use, the step and the reserve gives the cache about that; a share below what is
    in use is the error; the engine then runs a full step without running out of memory."""
    model = random_model(tiny_args(window=8), seed=1).cuda()
    config = EngineConfig(max_model_len=256, max_num_seqs=8, chunk_size=64)
    peak = kv_memory.step_peak(model, config, torch.device("cuda"), probe)
    assert 0 < peak < GIB
    free, total = torch.cuda.mem_get_info()
    share = (total - free + peak + GRAPH_RESERVE + (256 << 20)) / total
    got = kv_memory.cuda_kv_memory(model, replace(config, gpu_memory_utilization=share), torch.device("cuda"),
                                     probe)
    assert abs(got - (256 << 20)) < (64 << 20)
    with pytest.raises(RequestError, match="no GPU memory is left"):
        too_small = replace(config, gpu_memory_utilization=0.5 * (total - free) / total)
        kv_memory.cuda_kv_memory(model, too_small, torch.device("cuda"), probe)
    engine = LLMEngine(model, None, replace(config, gpu_memory_utilization=share))

    for i in range(8):
        engine.add_request(i, list(range(1, 40)), SamplingParams(max_tokens=4, ignore_eos=True))
    while engine.has_unfinished():
        engine.step()


def test_the_probe_step_runs_a_full_budget_and_leaves_the_model_as_it_was(monkeypatch):
    """The measured step's engine, run where there is no GPU (the memory counters stubbed): every row is
    admitted, pre-filled within one budget and sampled, and the model serves a real engine afterwards."""
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: calls.append("reset"))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 1000)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 1000 + (64 << 20))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append("empty"))
    steps = []
    step = LLMEngine.step

    def counted(self):
        steps.append(sum(len(s) for s in self.requests.values()))
        return step(self)

    monkeypatch.setattr(LLMEngine, "step", counted)
    model = random_model(tiny_args(window=8), seed=1)
    config = EngineConfig(max_model_len=256, max_num_seqs=8, chunk_size=64, max_num_batched_tokens=128)
    peak = kv_memory.step_peak(model, config, torch.device("cpu"), probe)
    cache_bytes = (8 * (math.ceil(17 / 16) + 1) + 1) * PagedKVCache.block_bytes(model.args, 16, model.dtype)
    assert peak == max(0, (64 << 20) - cache_bytes)
    assert calls == ["reset", "empty"] and steps[0] == 8  # all 8 rows in the first step
    monkeypatch.setattr(LLMEngine, "step", step)
    out, _ = engine_generate(model, [[1, 2, 3]], [SamplingParams(max_tokens=3, temperature=0)])
    assert len(out[0][0][0]) == 3
