"""The serving engine (paged cache, scheduler, prefix cache) against the core path: one sequence, no cache,
no batching (`reference_greedy`, whose single pass tests/model checks against transformers).

Windowed tiny models, sequences of 3W and more, chunk sizes below, at and above W, block sizes that do and do
not divide W, mixed lengths, prefix-cache hits, preemption, cancellation.
"""

from __future__ import annotations

import functools

import pytest
import torch

from mistral7b.cache.block_manager import max_blocks_per_seq
from mistral7b.engine.llm_engine import EngineConfig, LLMEngine
from mistral7b.engine.sampling_params import SamplingParams
from mistral7b.errors import RequestError
from tests.conftest import engine_generate, random_model, reference_greedy, tiny_args

W = 8


@pytest.fixture(scope="module")
def windowed():
    return random_model(tiny_args(window=W, n_heads=4, n_kv_heads=2), seed=3)


@pytest.fixture(scope="module")
def unwindowed():
    return random_model(tiny_args(window=None, n_heads=4, n_kv_heads=1), seed=4)


def make_prompts(lengths, seed=0, vocab=128):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


@functools.lru_cache(maxsize=None)
def _reference(model_id: int, prompt: tuple[int, ...], max_tokens: int):
    return reference_greedy(_MODELS[model_id], list(prompt), max_tokens)


_MODELS: dict[int, torch.nn.Module] = {}


def reference(model, prompt, max_tokens):
    _MODELS[id(model)] = model
    return _reference(id(model), tuple(prompt), max_tokens)


def assert_equal_to_core_path(model, prompts, params, out):
    for i, (prompt, sp) in enumerate(zip(prompts, params)):
        tokens, logprobs = out[i][0]
        ref_tokens, ref_logprobs = reference(model, prompt, sp.max_tokens)
        assert tokens == ref_tokens, f"prompt {i} (length {len(prompt)})"
        assert torch.allclose(torch.tensor(logprobs), torch.tensor(ref_logprobs), atol=1e-4), f"prompt {i}"


def run(engine, prompts, params, first_id=0):
    """Add requests, step the engine until they are done; return {id: [(tokens, logprobs) per completion]}."""
    out = {}
    for i, (p, sp) in enumerate(zip(prompts, params)):
        engine.add_request(first_id + i, list(p), sp)
        out[first_id + i] = [([], []) for _ in range(sp.n)]
    while engine.has_unfinished():
        for e in engine.step():
            if e.token_id is not None:
                out[e.request_id][e.index][0].append(e.token_id)
                out[e.request_id][e.index][1].append(e.logprob)
    return {i - first_id: v for i, v in out.items()}


def greedy(n):
    return SamplingParams(max_tokens=n, temperature=0, logprobs=True)


LENGTHS = [1, 5, W - 1, W, W + 1, 3 * W, 3 * W + 5, 4 * W + 3]
NEW_TOKENS = [2 * W + 3, W, 9, 1, 2 * W, W + 1, 5, 3 * W]


@pytest.mark.parametrize("block_size", [3, 4, 16])
@pytest.mark.parametrize("chunk", [1, W - 1, W, W + 1, 3 * W + 2])
def test_mixed_length_batch_equals_core_path(windowed, chunk, block_size):
    prompts = make_prompts(LENGTHS, seed=chunk)
    params = [greedy(n) for n in NEW_TOKENS]
    # A budget a little above one chunk: pre-fill chunks share steps with the running decodes.
    out, engine = engine_generate(windowed, prompts, params, chunk_size=chunk, block_size=block_size,
                                  max_num_batched_tokens=chunk + 3, enable_prefix_caching=False)
    assert_equal_to_core_path(windowed, prompts, params, out)
    assert engine.blocks.usage == 0.0


@pytest.mark.parametrize("chunk", [4, 64])
def test_model_without_window_equals_core_path(unwindowed, chunk):
    prompts = make_prompts([2, 17, 40, 9], seed=7)
    params = [greedy(n) for n in (30, 12, 20, 1)]
    out, engine = engine_generate(unwindowed, prompts, params, chunk_size=chunk, block_size=4)
    assert_equal_to_core_path(unwindowed, prompts, params, out)
    assert engine.blocks.usage == 0.0


@pytest.mark.parametrize("model_name", ["windowed", "unwindowed"])
def test_prefix_cache_hits_are_exact(model_name, request):
    model = request.getfixturevalue(model_name)
    engine = LLMEngine(model, None, EngineConfig(max_model_len=512, chunk_size=W, block_size=4))
    shared = make_prompts([5 * W + 3], seed=11)[0]
    tails = make_prompts([1, 4, W + 2], seed=12)
    first = run(engine, [shared], [greedy(6)])
    assert_equal_to_core_path(model, [shared], [greedy(6)], first)
    assert engine.blocks.prefix_hits == 0
    prompts = [shared + t for t in tails] + [shared]
    params = [greedy(n) for n in (W, 3, 2 * W, 6)]
    out = run(engine, prompts, params, first_id=10)
    assert_equal_to_core_path(model, prompts, params, out)
    # Every later prompt starts with the 43 cached tokens: 10 full blocks of 4 (the last token is recomputed).
    assert engine.blocks.prefix_hits >= 4 * 40
    assert engine.blocks.usage == 0.0


def test_prefix_hit_with_window_takes_only_the_blocks_in_the_window(windowed):
    engine = LLMEngine(windowed, None, EngineConfig(max_model_len=512, chunk_size=W, block_size=4))
    prompt = make_prompts([6 * W], seed=13)[0]
    run(engine, [prompt], [greedy(2)])
    engine.add_request("again", prompt + [1, 2, 3], greedy(2))
    seq = engine.requests["again"][0]
    engine.step()  # admission: the prefix cache gives 12 blocks (48 tokens); only the window's blocks are held
    assert seq.num_cached_tokens == 48
    held = [b for b in seq.block_table if b != 0]
    assert seq.first_live_block == (48 - W + 1) // 4 and len(held) <= (W + W - 2) // 4 + 2
    while engine.has_unfinished():
        engine.step()


@pytest.mark.parametrize("model_name,num_blocks", [("windowed", 8), ("unwindowed", 16)])
def test_preemption_recomputes_exactly_and_never_deadlocks(model_name, num_blocks, request):
    model = request.getfixturevalue(model_name)
    prompts = make_prompts([3, 3 * W, 2 * W + 1, 7, W, 11, 2, 3 * W + 1], seed=21)
    params = [greedy(n) for n in (20, 12, 9, 25, 14, 6, 22, 3)]
    out, engine = engine_generate(model, prompts, params, chunk_size=W, block_size=4, num_blocks=num_blocks,
                                  max_model_len=64)
    assert engine.scheduler.num_preemptions > 0
    assert_equal_to_core_path(model, prompts, params, out)
    assert engine.blocks.usage == 0.0 and not engine.requests


def test_windowed_sequence_holds_a_bounded_number_of_blocks_for_20W_tokens(windowed, unwindowed):
    bs, n_new = 4, 20 * W
    prompt = make_prompts([3], seed=5)[0]
    for model, bound in ((windowed, max_blocks_per_seq(10**9, W, bs, W)), (unwindowed, None)):
        engine = LLMEngine(model, None, EngineConfig(max_model_len=1024, chunk_size=W, block_size=bs))
        engine.add_request(0, prompt, greedy(n_new))
        seq = engine.requests[0][0]
        most, tokens, logprobs = 0, [], []
        while engine.has_unfinished():
            for e in engine.step():
                if e.token_id is not None:
                    tokens.append(e.token_id)
                    logprobs.append(e.logprob)
            most = max(most, sum(1 for b in seq.block_table if b != 0))
            assert engine.blocks.num_blocks - engine.blocks.num_free == sum(1 for b in seq.block_table if b != 0)
        ref_tokens, ref_logprobs = reference(model, prompt, n_new)
        assert tokens == ref_tokens
        assert torch.allclose(torch.tensor(logprobs), torch.tensor(ref_logprobs), atol=1e-4)
        if bound is not None:
            assert most <= bound == 5  # (W + W - 2) // 4 + 2: about W + one chunk, never 20W
        else:
            assert most == -(-(3 + n_new - 1) // bs)  # without a window the cache grows with the sequence


def test_abort_at_every_stage_frees_the_blocks(windowed):
    engine = LLMEngine(windowed, None, EngineConfig(max_model_len=256, chunk_size=4, block_size=4,
                                                    max_num_batched_tokens=5, enable_prefix_caching=False))
    long, short, waiting = make_prompts([4 * W, 2, 3 * W], seed=8)
    engine.add_request("decoding", short, greedy(50))
    engine.add_request("prefilling", long, greedy(50))
    engine.add_request("waiting", waiting, greedy(50))
    for _ in range(2):
        engine.step()
    prefilling = engine.requests["prefilling"][0]
    assert engine.requests["decoding"][0].num_output > 0 and prefilling.in_prefill and prefilling.num_computed > 0
    assert engine.requests["waiting"][0].num_computed == 0
    assert engine.abort_request("waiting") and engine.abort_request("prefilling")
    assert engine.num_running == 1 and engine.num_waiting == 0
    assert engine.blocks.num_blocks - engine.blocks.num_free == len(engine.requests["decoding"][0].block_table)
    assert engine.abort_request("decoding")
    assert not engine.abort_request("decoding")  # already gone: a no-op
    assert engine.blocks.usage == 0.0 and not engine.has_unfinished() and engine.step() == []


def test_seeded_sampling_is_reproducible_and_independent_of_the_batch(windowed):
    prompt = make_prompts([2 * W], seed=9)[0]
    sampled = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=42, n=3)
    alone, engine = engine_generate(windowed, [prompt], [sampled], chunk_size=W, block_size=4)
    again, _ = engine_generate(windowed, [prompt], [sampled], chunk_size=W, block_size=4)
    others = make_prompts([5, 3 * W], seed=10)
    crowded, _ = engine_generate(windowed, others + [prompt], [greedy(9), greedy(4), sampled], chunk_size=W,
                                 block_size=4)
    assert alone[0] == again[0]
    assert [c[0] for c in crowded[2]] == [c[0] for c in alone[0]]
    assert len({tuple(c[0]) for c in alone[0]}) > 1  # the completions differ from each other
    assert engine.blocks.prefix_hits > 0  # siblings 2 and 3 reuse the first one's pre-fill


def test_min_tokens_holds_back_stop_ids(windowed):
    prompt = make_prompts([W], seed=14)[0]
    ref, _ = reference(windowed, prompt, 30)
    stop_id = ref[0]
    out, _ = engine_generate(windowed, [prompt], [SamplingParams(max_tokens=30, temperature=0,
                                                                  stop_token_ids=[stop_id])])
    assert out[0][0][0] == [stop_id]  # stops at once
    engine = LLMEngine(windowed, None, EngineConfig(max_model_len=256))
    engine.add_request(0, prompt, SamplingParams(max_tokens=30, temperature=0, stop_token_ids=[stop_id],
                                                 min_tokens=3))
    tokens, reason = [], None
    while engine.has_unfinished():
        for e in engine.step():
            if e.token_id is not None:
                tokens.append(e.token_id)
            reason = e.finish_reason or reason
    assert stop_id not in tokens[:3] and len(tokens) >= 3
    assert reason == "length" or (tokens[-1] == stop_id and reason == "stop")


def test_prompt_logprobs_equal_the_core_path(windowed):
    prompt = make_prompts([3 * W + 5], seed=15)[0]
    engine = LLMEngine(windowed, None, EngineConfig(max_model_len=256, chunk_size=5, block_size=4))
    engine.add_request(0, prompt, SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=3))
    events = []
    while engine.has_unfinished():
        events.extend(engine.step())
    got = next(e.prompt_logprobs for e in events if e.prompt_logprobs is not None)
    with torch.inference_mode():  # one pass over the whole prompt, no cache
        logp = windowed(torch.tensor([prompt]), torch.arange(len(prompt))[None])[0].log_softmax(-1)
    ref = logp[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])]
    assert got[0] is None and len(got) == len(prompt)
    assert torch.allclose(torch.tensor([lp for lp, _ in got[1:]]), ref, atol=1e-4)
    for (lp, top), token in zip(got[1:], prompt[1:]):
        assert len(top) == 3 and top[0][1] >= lp - 1e-6
        assert (top[0][0] == token) == (abs(top[0][1] - lp) < 1e-6)


def test_bad_requests_are_clear_errors(windowed, unwindowed):
    engine = LLMEngine(unwindowed, None, EngineConfig(max_model_len=64, block_size=4, num_blocks=6))
    with pytest.raises(RequestError, match="maximum context length is 64"):
        engine.add_request(0, [1] * 60, greedy(5))
    with pytest.raises(RequestError, match="not in"):
        engine.add_request(0, [1, 128], greedy(5))
    with pytest.raises(RequestError, match="empty"):
        engine.add_request(0, [], greedy(5))
    with pytest.raises(RequestError, match="KV cache blocks"):
        engine.add_request(0, [1] * 20, greedy(10))  # 30 tokens need 8 blocks of 4; the pool has 6
    engine.add_request(0, [1] * 3, greedy(5))
    with pytest.raises(RequestError, match="already"):
        engine.add_request(0, [1] * 3, greedy(5))
    # With a window the same request fits: the sequence never holds more than the window's blocks.
    windowed_engine = LLMEngine(windowed, None, EngineConfig(max_model_len=64, block_size=4, num_blocks=6,
                                                             chunk_size=4))
    windowed_engine.add_request(0, [1] * 20, greedy(10))
