"""The batched sampler (engine/sampler.py) against Hugging Face's logits processors and warpers (the oracle): every
filter keeps exactly the tokens the oracle keeps and draws them with its probabilities (many draws, within
statistical bounds), rows of every kind in one batch as alone, greedy rows exact, seeded rows the same alone and
in any batch, penalties, bias and bans as OpenAI / vLLM define them, slots reused without leftovers."""

from __future__ import annotations

import math

import pytest
import torch

from mistral7b import cpu
from mistral7b.engine import sampler as sampler_module
from mistral7b.engine.sampler import Sampler, counter_uniforms
from mistral7b.engine.sampling_params import SamplingParams
from mistral7b.errors import RequestError

transformers = pytest.importorskip("transformers")
VOCAB = 50
# The GPU runs the same sampler code (torch ops): where a GPU is present its draws are held to the same oracle.
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def logits_row(seed: int = 0, vocab: int = VOCAB) -> torch.Tensor:
    return torch.randn(vocab, generator=torch.Generator().manual_seed(seed)) * 3


def sampler_for(params: list[SamplingParams], prompt=(), output=(), banned=(), seed=0,
                device: str = "cpu") -> tuple[Sampler, torch.Tensor]:
    s = Sampler(len(params), VOCAB, device, seed=seed)
    slots = [s.admit(i, p, list(prompt), list(output), list(banned)) for i, p in enumerate(params)]
    return s, torch.tensor(slots, device=device)


def hf_probs(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """The oracle: temperature, then HF's top-k, top-p and min-p warpers in vLLM's order, softmax."""
    x = logits[None] / p.temperature
    if p.top_k:
        x = transformers.TopKLogitsWarper(p.top_k)(None, x)
    if p.top_p < 1.0:
        x = transformers.TopPLogitsWarper(p.top_p)(None, x)
    if p.min_p:
        x = transformers.MinPLogitsWarper(p.min_p)(None, x)
    return x[0].softmax(-1)


def draws(logits: torch.Tensor, p: SamplingParams, n: int = 6000, candidates: str = "topk",
          device: str = "cpu") -> torch.Tensor:
    s, slots = sampler_for([p] * n, device=device)
    return s.sample(logits.to(device).expand(n, -1).contiguous(), slots, candidates=candidates).tokens.cpu()


def assert_distribution(tokens: torch.Tensor, probs: torch.Tensor) -> None:
    n = len(tokens)
    freq = torch.bincount(tokens, minlength=len(probs)).double() / n
    assert set(tokens.tolist()) <= set((probs > 0).nonzero()[:, 0].tolist())  # only allowed tokens, ever
    bound = 5 * torch.sqrt(probs.double() * (1 - probs.double()) / n) + 1e-3
    assert ((freq - probs.double()).abs() <= bound).all(), (freq, probs)


KINDS = [
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.7, top_k=5),
    SamplingParams(temperature=1.3, top_p=0.8),  # top-p without top-k: the sorted vocabulary
    SamplingParams(temperature=1.0, min_p=0.1),
    SamplingParams(temperature=0.9, top_k=10, top_p=0.7, min_p=0.05),
    SamplingParams(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05),  # llama.cpp's defaults
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("p", KINDS)
@pytest.mark.parametrize("candidates", ["auto", "topk", "sort", "threshold"])
def test_each_kind_draws_the_oracles_distribution(p, candidates, device):
    if candidates == "threshold" and (device != "cpu" or not hasattr(cpu.load(notice=False), "top_p_threshold")):
        pytest.skip("the threshold is the CPU extension's")
    logits = logits_row(1)
    assert_distribution(draws(logits, p, candidates=candidates, device=device), hf_probs(logits, p))


def test_every_kind_in_one_batch_as_alone():
    """Rows of all kinds (and greedy ones) together: each row's draws follow its own oracle."""
    logits = logits_row(2)
    kinds = KINDS + [SamplingParams(temperature=0)]
    n = 3000
    params = [p for p in kinds for _ in range(n)]
    s, slots = sampler_for(params)
    tokens = s.sample(logits.expand(len(params), -1).contiguous(), slots).tokens
    for i, p in enumerate(kinds):
        got = tokens[i * n : (i + 1) * n]
        if p.greedy:
            assert (got == logits.argmax()).all()
        else:
            assert_distribution(got, hf_probs(logits, p))


def test_greedy_rows_are_the_exact_argmax():
    logits = torch.randn(64, VOCAB, generator=torch.Generator().manual_seed(3))
    s, slots = sampler_for([SamplingParams(temperature=0), SamplingParams(temperature=2.0, top_k=1)] * 32)
    assert torch.equal(s.sample(logits, slots).tokens, logits.argmax(-1))


@pytest.mark.parametrize("device", DEVICES)
def test_a_seeded_row_draws_the_same_alone_and_in_any_batch(device):
    logits = logits_row(4).to(device)
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=11)

    def run(batch_params: list[SamplingParams], row: int, steps: int = 20, seed: int = 123) -> list[int]:
        s, slots = sampler_for(batch_params, seed=seed, device=device)
        out = []
        for _ in range(steps):
            tokens = s.sample(logits.expand(len(batch_params), -1).contiguous(), slots).tokens
            out.append(int(tokens[row]))
        return out

    alone = run([seeded], 0)
    assert alone == run([SamplingParams(temperature=1.0), seeded, SamplingParams(temperature=0)], 1, seed=5)
    assert alone == run([seeded, SamplingParams(temperature=0.5, top_k=3)] + [SamplingParams()] * 5, 0)
    assert len(set(alone)) > 1  # a real draw, not a constant
    assert alone != run([SamplingParams(temperature=1.0, top_p=0.9, seed=12)], 0)  # the seed is what decides


def test_a_seeded_sequence_resumes_its_draws_after_it_gives_its_slot_back():
    """A preempted sequence comes back with its output so far: its next draws are those it would have made."""
    logits = logits_row(5)[None]
    params = SamplingParams(temperature=1.0, seed=7)
    s, slots = sampler_for([params])
    straight = [int(s.sample(logits, slots).tokens) for _ in range(12)]
    s, slots = sampler_for([params])
    first = [int(s.sample(logits, slots).tokens) for _ in range(5)]
    s.release(int(slots), params)
    slot = s.admit("again", params, [], first, [])
    rest = [int(s.sample(logits, torch.tensor([slot])).tokens) for _ in range(7)]
    assert first + rest == straight


def test_counter_uniforms_are_uniform_and_independent_across_draws_and_seeds():
    """The seeded rows' generator: 200,000 values over 2,000 seeds x 100 draws, each decile within 5 standard
    deviations of its 10%, no lag-1 correlation along a sequence or between neighbouring seeds, in [0, 1)."""
    seeds = torch.arange(2000, dtype=torch.long)[:, None]
    counters = torch.arange(100, dtype=torch.long)[None]
    u = counter_uniforms(seeds.expand(-1, 100), counters.expand(2000, -1))
    assert u.dtype == torch.float32 and float(u.min()) >= 0.0 and float(u.max()) < 1.0
    n = u.numel()
    deciles = torch.bincount((u * 10).long().flatten(), minlength=10).double() / n
    assert (deciles - 0.1).abs().max() < 5 * (0.1 * 0.9 / n) ** 0.5
    centred = u.double() - 0.5
    along = (centred[:, 1:] * centred[:, :-1]).mean() / centred.var()
    across = (centred[1:] * centred[:-1]).mean() / centred.var()
    assert abs(float(along)) < 0.01 and abs(float(across)) < 0.01
    assert torch.equal(u, counter_uniforms(seeds.expand(-1, 100), counters.expand(2000, -1)))  # deterministic


def test_repetition_penalty_matches_hf():
    logits = logits_row(6)
    prompt = torch.topk(logits, 3).indices.tolist()  # the three best tokens were seen
    ref = transformers.RepetitionPenaltyLogitsProcessor(2.0)(torch.tensor([prompt]), logits[None].clone())[0]
    s, slots = sampler_for([SamplingParams(temperature=0, repetition_penalty=2.0)], prompt=prompt)
    assert s.penalized(logits[None], slots)[0].allclose(ref)
    assert int(s.sample(logits[None], slots).tokens) == int(ref.argmax())


def test_presence_and_frequency_penalties_follow_openai_and_count_draws():
    logits = logits_row(4)
    logits[3] = logits.max() + 4.0  # the best token, by a margin the penalties remove
    output = [3, 3, 3, 9]
    want = logits.clone()
    want[3] -= 0.5 + 1.5 * 3
    want[9] -= 0.5 + 1.5 * 1
    s, slots = sampler_for([SamplingParams(temperature=0, presence_penalty=0.5, frequency_penalty=1.5)],
                           output=output)
    assert torch.allclose(s.penalized(logits[None], slots)[0], want)
    first = int(s.sample(logits[None], slots).tokens)
    assert first == int(want.argmax()) and first != 3
    want[first] -= 0.5 + 1.5  # the draw is counted on the device for the next step
    assert torch.allclose(s.penalized(logits[None], slots)[0], want)


def test_logit_bias_bans_until_min_tokens_and_raw_top_logprobs():
    logits = logits_row(5)
    best, second = logits.topk(2).indices.tolist()
    params = [SamplingParams(temperature=0, logit_bias={best: -100.0}),
              SamplingParams(temperature=0, logit_bias={7: 100.0}),
              SamplingParams(temperature=0, min_tokens=2, logprobs=True, top_logprobs=3), SamplingParams(temperature=0)]
    s, slots = sampler_for(params, banned=[best])
    out = s.sample(logits.expand(4, -1).contiguous(), slots, logprobs=True, top_logprobs=3)
    assert out.tokens.tolist() == [second, 7, second, best]
    ref = logits.log_softmax(-1).topk(3)
    assert out.top_ids[2].tolist() == ref.indices.tolist() and torch.allclose(out.top_logprobs[2], ref.values)
    assert float(out.logprobs[2]) == pytest.approx(float(logits.log_softmax(-1)[second]))  # raw: the ban is not in it
    assert int(s.sample(logits.expand(4, -1).contiguous(), slots).tokens[2]) == second  # second token: still banned
    assert int(s.sample(logits.expand(4, -1).contiguous(), slots).tokens[2]) == best  # min_tokens reached


def test_a_reused_slot_keeps_nothing_of_its_last_owner():
    logits = logits_row(7)
    s = Sampler(1, VOCAB, "cpu", seed=0)
    heavy = SamplingParams(temperature=0, logit_bias={int(logits.argmax()): -100.0}, repetition_penalty=3.0,
                           min_tokens=5)
    slot = s.admit("a", heavy, [1, 2], [int(logits.argmax())], [int(logits.argmax())])
    s.sample(logits[None], torch.tensor([slot]))
    s.release(slot, heavy)
    slot = s.admit("b", SamplingParams(temperature=0), [], [], [])
    assert int(s.sample(logits[None], torch.tensor([slot])).tokens) == int(logits.argmax())
    assert not s.uses["bias"] and not s.uses["penalty"] and not s.uses["ban"]


@pytest.mark.parametrize(
    "field,value",
    [("temperature", -1), ("temperature", float("nan")), ("top_p", 0.0), ("top_p", 1.5), ("top_k", -1),
     ("min_p", 2.0), ("max_tokens", 0), ("repetition_penalty", 0.0), ("seed", -3), ("max_tokens", "9"),
     ("stop", [""]), ("stop_token_ids", [-1]), ("temperature", float("inf"))],
)
def test_bad_sampling_params_name_the_field(field, value):
    with pytest.raises(RequestError, match=field):
        SamplingParams(**{field: value})


@pytest.mark.parametrize(
    "field,value",
    [("n", 0), ("n", 129), ("presence_penalty", 2.5), ("frequency_penalty", float("nan")), ("top_logprobs", 21),
     ("prompt_logprobs", -1), ("logit_bias", {1: 101.0}), ("logit_bias", {-1: 1.0}), ("min_tokens", 300)],
)
def test_bad_serving_params_name_the_field(field, value):
    with pytest.raises(RequestError, match=field):
        SamplingParams(**{field: value})


def test_statistical_bound_is_not_vacuous():
    """The distribution check fails a sampler that draws from the wrong distribution."""
    logits = logits_row(1)
    p = SamplingParams(temperature=1.0, top_k=5)
    wrong = hf_probs(logits, SamplingParams(temperature=1.0, top_k=6))
    with pytest.raises(AssertionError):
        assert_distribution(draws(logits, p), wrong)
    assert math.isfinite(float(hf_probs(logits, p).sum()))


@pytest.mark.parametrize("extension", [True, False])
@pytest.mark.parametrize("p", [SamplingParams(temperature=1.0, top_p=0.9),
                               SamplingParams(temperature=0.8, top_p=0.95, min_p=0.3)])
def test_top_p_over_a_flat_distribution_draws_from_the_nucleus(p, extension, monkeypatch):
    """A flat distribution: the nucleus is wider than the 1,024 candidates of a CPU without the extension, which
    then sorts those rows; with the extension, the threshold (cpu/sample.cpp) over the whole vocabulary. Either
    draws only the oracle's nucleus, with its probabilities (per token, and summed over groups of tokens, where a
    token's own frequency bound is loose)."""
    if extension and getattr(cpu.load(notice=False), "top_p_threshold", None) is None:
        pytest.skip("CPU extension not built")
    if not extension:
        monkeypatch.setattr(cpu, "load", lambda notice=True: None)
    vocab, rows, steps = 4096, 500, 40
    logits = torch.randn(vocab, generator=torch.Generator().manual_seed(5)) * 0.3
    probs = hf_probs(logits, p)
    top_p_only = hf_probs(logits, SamplingParams(temperature=p.temperature, top_p=p.top_p))
    assert (top_p_only > 0).sum() > 1024  # wider than the candidates: the rows take the wide path
    s = Sampler(rows, vocab, "cpu", seed=7)
    slots = torch.tensor([s.admit(i, p, [], [], []) for i in range(rows)])
    assert sampler_module._top_p_method("auto", logits[None]) == ("threshold" if extension else "topk")
    tokens = torch.cat([s.sample(logits.expand(rows, -1).contiguous(), slots).tokens for _ in range(steps)])
    assert_distribution(tokens, probs)
    kept = int((probs > 0).sum())
    nucleus = probs.argsort(descending=True)[:kept]
    groups = torch.full((vocab,), 8, dtype=torch.long)  # 8: outside the nucleus (never drawn, checked above)
    groups[nucleus] = torch.arange(kept) * 8 // kept  # 8 groups of the nucleus by rank
    n = len(tokens)
    freq = torch.bincount(groups[tokens], minlength=9)[:8].double() / n
    mass = torch.zeros(8, dtype=torch.float64).index_add_(0, groups[nucleus], probs[nucleus].double())
    assert ((freq - mass).abs() <= 5 * torch.sqrt(mass * (1 - mass) / n)).all(), (freq, mass)


@pytest.mark.parametrize("p", [SamplingParams(temperature=1.0, top_p=0.9), SamplingParams(temperature=1.0),
                               SamplingParams(temperature=0.8, top_k=5, top_p=0.9)])
def test_a_broken_row_does_not_stop_the_batch(p):
    """Rows of NaN or of -inf logits (a broken model's, or every token banned) draw some token instead of raising
    for the whole batch (an error here would end the engine for every request); the other rows draw as usual."""
    logits = logits_row(9).expand(6, -1).clone()
    logits[1] = float("nan")
    logits[3] = float("-inf")
    s, slots = sampler_for([p] * 6, seed=3)
    tokens = s.sample(logits, slots).tokens
    assert tokens.shape == (6,) and ((tokens >= 0) & (tokens < VOCAB)).all()
    allowed = set((hf_probs(logits_row(9), p) > 0).nonzero()[:, 0].tolist())
    assert {int(tokens[i]) for i in (0, 2, 4, 5)} <= allowed

