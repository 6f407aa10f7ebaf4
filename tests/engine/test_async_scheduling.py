"""Async scheduling (EngineConfig.async_scheduling): greedy decode steps launched one step ahead of reading the
previous picks back. Same tokens and log-probabilities as the core path; sequences that finish (length, stop
token), are aborted, or arrive while a step is in flight are handled; sampled requests run ahead too; prefix-cache
commits stay exact; every block returns to the pool."""

from __future__ import annotations

import pytest
import torch

from mistral7b.engine.llm_engine import EngineConfig, LLMEngine
from mistral7b.engine.sampling_params import SamplingParams
from mistral7b.errors import RequestError
from tests.conftest import random_model, reference_greedy, tiny_args
from tests.engine.test_llm_engine import assert_equal_to_core_path, greedy, make_prompts, run

W = 8


@pytest.fixture(scope="module")
def model():
    return random_model(tiny_args(window=W, n_heads=4, n_kv_heads=2), seed=3)


def engine(model, **kw):
    config = dict(max_model_len=512, chunk_size=W + 1, block_size=4, async_scheduling=True)
    config.update(kw)
    return LLMEngine(model, None, EngineConfig(**config))


def test_mixed_lengths_equal_core_path_and_steps_ran_ahead(model):
    e = engine(model)
    prompts = make_prompts([1, 5, W, 3 * W + 1], seed=1)
    params = [greedy(n) for n in (3 * W, 2, W + 3, 2 * W)]
    launched = []
    real_launch = e._launch_picks
    e._launch_picks = lambda seqs, *a: launched.append(len(seqs)) or real_launch(seqs, *a)
    out = run(e, prompts, params)
    assert_equal_to_core_path(model, prompts, params, out)
    assert len(launched) > 2 * W  # decode steps went through the async path
    assert e.blocks.usage == 0.0 and e._pending is None


def test_stop_token_abort_and_late_arrival(model):
    e = engine(model)
    prompts = make_prompts([6, 2 * W, 3], seed=5)
    ref = [reference_greedy(model, p, 2 * W)[0] for p in prompts]
    stop_at = ref[0][4]
    e.add_request("stops", prompts[0], SamplingParams(max_tokens=2 * W, temperature=0, stop_token_ids=[stop_at]))
    e.add_request("aborted", prompts[1], greedy(2 * W))
    got = {"stops": [], "aborted": [], "late": []}
    steps = 0
    while e.has_unfinished():
        for ev in e.step():
            if ev.token_id is not None:
                got[ev.request_id].append(ev.token_id)
        steps += 1
        if steps == 4:
            e.add_request("late", prompts[2], greedy(W))
        if len(got["aborted"]) == 3 and "aborted" in e.requests:
            assert e.abort_request("aborted")
    assert got["stops"] == ref[0][: ref[0].index(stop_at) + 1]
    assert got["aborted"] == ref[1][:3]
    assert got["late"] == ref[2][:W]
    assert e.blocks.usage == 0.0


def test_sampled_requests_run_ahead_and_match_the_synchronous_engine(model):
    """The batched sampler draws on the device with no read-back: seeded, penalised, min_tokens and
    top_logprobs rows run ahead like greedy ones, with the synchronous engine's tokens and log-probabilities."""
    prompts = make_prompts([4, 9, 6], seed=8)
    params = [SamplingParams(max_tokens=12, temperature=0.9, seed=11, logprobs=True),
              SamplingParams(max_tokens=10, temperature=0.7, top_k=5, top_p=0.9, seed=3, repetition_penalty=1.3,
                             frequency_penalty=0.5, min_tokens=6, stop_token_ids=[1, 2], top_logprobs=2),
              greedy(12)]
    sync = run(engine(model, async_scheduling=False), prompts, params)
    e = engine(model)
    launched = []
    real_launch = e._launch_picks
    e._launch_picks = lambda seqs, *a: launched.append(len(seqs)) or real_launch(seqs, *a)
    asyn = run(e, prompts, params)
    for i in sync:  # tokens exactly; log-probabilities to float rounding (a step run ahead may hold a finished
        (tokens, logprobs), = sync[i]  # row, and float32 matmuls round differently by batch size)
        (got, got_logprobs), = asyn[i]
        assert got == tokens and got_logprobs == pytest.approx(logprobs, abs=1e-5)
    assert len(launched) >= 8 and e._pending is None
    assert len(e.sampler.free) == len(e.sampler.owner) and not +e.sampler.uses and not e.sampler.top_ks  # all back


def test_prefix_cache_commits_stay_exact(model):
    e = engine(model)
    prompt = make_prompts([3 * W], seed=13)[0]
    first = run(e, [prompt], [greedy(2 * W)])
    assert_equal_to_core_path(model, [prompt], [greedy(2 * W)], first)
    longer = prompt + first[0][0][0][: 2 * W - 1]  # the prompt and the first answer: cached while generated
    out = run(e, [longer], [greedy(W)], first_id=5)
    assert_equal_to_core_path(model, [longer], [greedy(W)], out)
    assert e.blocks.prefix_hits >= 4 * ((len(longer) - 1) // 4) - 4
    assert e.blocks.usage == 0.0


def test_on_the_kernel_path(model):
    """The paged-attention and rotary-store kernels (Triton's interpreter here) with the picks fed back as a
    tensor, as on a GPU."""
    import copy

    from mistral7b import kernels
    from mistral7b.model.fuse import fuse_projections

    if not kernels.available():
        pytest.skip("triton is not installed")

    fused = fuse_projections(copy.deepcopy(model).to("cuda" if torch.cuda.is_available() else "cpu"))
    prompts = make_prompts([2, W + 3], seed=21)
    params = [greedy(W + 2), greedy(5)]
    out = run(engine(fused, attention="triton"), prompts, params)
    assert_equal_to_core_path(model, prompts, params, out)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="decode graphs need a GPU")
@pytest.mark.parametrize("zero_copy", [True, False])
def test_decode_graphs_feed_their_picks_back(model, monkeypatch, zero_copy):
    """On a GPU: decode graphs that read their inputs from pinned memory and make the greedy picks themselves
    (zero copy), or that take a copy of the inputs and leave the picks to the engine; sequences that finish
    early make the next step's tokens a subset of the picks."""
    import copy

    from mistral7b.kernels.tuning import DecodeTuning
    from mistral7b.model.fuse import fuse_projections

    fused = fuse_projections(copy.deepcopy(model).to("cuda"))
    e = engine(fused, attention="triton", max_num_seqs=4, tuning=DecodeTuning(zero_copy=zero_copy))
    assert e.runner.graphs.zero_copy == zero_copy
    made = []
    real_launch = e._launch_picks
    e._launch_picks = lambda *a: made.append(e.runner.picks is not None) or real_launch(*a)
    prompts = make_prompts([2, W + 3, 5, 1], seed=22)
    params = [greedy(3 * W + 2), greedy(5), greedy(W), greedy(2 * W)]
    out = run(e, prompts, params)
    assert_equal_to_core_path(model, prompts, params, out)
    assert e.runner.graph_steps > 3 * W and any(made) == zero_copy
    assert e.blocks.usage == 0.0 and e._pending is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="decode graphs need a GPU")
def test_no_garbage_collection_while_capturing(model):
    """Collections are held off while the decode graphs are captured (a collection there frees older engines'
    pinned buffers and graphs, which invalidates the capture): garbage collected at every chance otherwise."""
    import copy
    import gc

    from mistral7b.model.fuse import fuse_projections

    fused = fuse_projections(copy.deepcopy(model).to("cuda"))
    during = []

    def watch(phase, info):
        if phase == "start":
            during.append(torch.cuda.is_current_stream_capturing())

    threshold = gc.get_threshold()
    gc.callbacks.append(watch)
    try:
        gc.set_threshold(1)
        e = engine(fused, attention="triton", max_num_seqs=8)
    finally:
        gc.set_threshold(*threshold)
        gc.callbacks.remove(watch)
    assert e.runner.graphs is not None and len(e.runner.graphs.graphs) == 4  # buckets 1, 2, 4, 8
    assert during.count(False) > 10 and not any(during)
    out = run(e, make_prompts([3], seed=2), [greedy(4)])
    assert_equal_to_core_path(model, make_prompts([3], seed=2), [greedy(4)], out)


def test_default_is_on_only_with_cuda_graphs(model):
    """async_scheduling=None (the default) runs ahead only where decode steps replay CUDA graphs: on a CPU every
    step is read back before the next; a value other than true/false/None is refused."""
    e = engine(model, async_scheduling=None)
    launched = []
    e._launch_picks = lambda seqs, *a: launched.append(len(seqs))
    out = run(e, make_prompts([3, W + 2], seed=4), [greedy(W), greedy(W)])
    assert launched == [] and all(len(out[i][0][0]) == W for i in out)
    with pytest.raises(RequestError, match="async_scheduling must be true or false"):
        EngineConfig(max_model_len=64, async_scheduling="yes").validate()
