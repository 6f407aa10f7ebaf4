"""The sampler's logits processing against Hugging Face's logits processors (the oracle), and its draws."""

from __future__ import annotations

import pytest
import torch

from mistral7b.engine.sampler import apply_presence_frequency, apply_repetition_penalty, filter_logits, sample_token
from mistral7b.engine.sampling_params import SamplingParams
from mistral7b.errors import RequestError

transformers = pytest.importorskip("transformers")


def logits_row(seed: int = 0, vocab: int = 50) -> torch.Tensor:
    return torch.randn(vocab, generator=torch.Generator().manual_seed(seed)) * 3


def test_repetition_penalty_matches_hf():
    logits = logits_row()
    seen = torch.tensor([1, 5, 5, 7, 20])
    ref = transformers.RepetitionPenaltyLogitsProcessor(1.3)(seen[None], logits[None].clone())[0]
    assert torch.allclose(apply_repetition_penalty(logits, seen, 1.3), ref)


@pytest.mark.parametrize("top_k,top_p,min_p", [(5, 1.0, 0.0), (0, 0.7, 0.0), (0, 1.0, 0.1), (10, 0.9, 0.05)])
def test_filters_keep_the_same_tokens_as_hf(top_k, top_p, min_p):
    logits = logits_row(1)
    params = SamplingParams(temperature=0.8, top_k=top_k, top_p=top_p, min_p=min_p)
    ref = logits[None] / 0.8
    if top_k:
        ref = transformers.TopKLogitsWarper(top_k)(None, ref)
    if top_p < 1.0:
        ref = transformers.TopPLogitsWarper(top_p)(None, ref)
    if min_p:
        ref = transformers.MinPLogitsWarper(min_p)(None, ref)
    got = filter_logits(logits, params)
    assert torch.equal(torch.isfinite(got), torch.isfinite(ref[0]))
    assert torch.allclose(got[torch.isfinite(got)], ref[0][torch.isfinite(ref[0])])


def test_greedy_and_raw_logprob():
    logits = logits_row(2)
    sample = sample_token(logits, SamplingParams(temperature=0, logprobs=True))
    assert sample.token == int(logits.argmax())
    assert sample.logprob == pytest.approx(float(logits.log_softmax(-1).max()))


def test_seeded_sampling_is_reproducible_and_follows_the_distribution():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.2]))
    params = SamplingParams(temperature=1.0, seed=7)

    def draws(seed: int, n: int = 3000) -> list[int]:
        g = torch.Generator().manual_seed(seed)
        return [sample_token(logits, params, generator=g).token for _ in range(n)]

    first = draws(7)
    assert first == draws(7)
    assert first != draws(8)
    freq = torch.bincount(torch.tensor(first), minlength=3).float() / len(first)
    assert torch.allclose(freq, torch.tensor([0.5, 0.3, 0.2]), atol=0.04)


def test_top_k_one_is_greedy_even_with_temperature():
    logits = logits_row(3)
    g = torch.Generator().manual_seed(0)
    sample = sample_token(logits, SamplingParams(temperature=2.0, top_k=1), generator=g)
    assert sample.token == int(logits.argmax())


@pytest.mark.parametrize(
    "field,value",
    [("temperature", -1), ("temperature", float("nan")), ("top_p", 0.0), ("top_p", 1.5), ("top_k", -1),
     ("min_p", 2.0), ("max_tokens", 0), ("repetition_penalty", 0.0), ("seed", -3), ("max_tokens", "9"),
     ("stop", [""]), ("stop_token_ids", [-1]), ("temperature", float("inf"))],
)
def test_bad_sampling_params_name_the_field(field, value):
    with pytest.raises(RequestError, match=field):
        SamplingParams(**{field: value})


def test_presence_and_frequency_penalties_follow_openai_formula():
    logits = logits_row(4)
    logits[3] = logits.max() + 4.0  # the best token, by a margin the penalties remove
    output = [3, 3, 3, 9]
    want = logits.clone()
    want[3] -= 0.5 + 1.5 * 3
    want[9] -= 0.5 + 1.5 * 1
    assert torch.allclose(apply_presence_frequency(logits, output, 0.5, 1.5), want)
    got = sample_token(logits, SamplingParams(temperature=0, presence_penalty=0.5, frequency_penalty=1.5),
                       output=output)
    assert got.token == int(want.argmax()) and got.token != 3


def test_logit_bias_bans_and_top_logprobs():
    logits = logits_row(5)
    best = int(logits.argmax())
    biased = sample_token(logits, SamplingParams(temperature=0, logit_bias={best: -100.0}))
    assert biased.token != best and biased.token == int(logits.topk(2).indices[1])
    forced = sample_token(logits, SamplingParams(temperature=0, logit_bias={7: 100.0}))
    assert forced.token == 7
    banned = sample_token(logits, SamplingParams(temperature=0), banned=[best])
    assert banned.token == int(logits.topk(2).indices[1])
    top = sample_token(logits, SamplingParams(temperature=0, logprobs=True, top_logprobs=3))
    ref = logits.log_softmax(-1).topk(3)
    assert [t for t, _ in top.top] == ref.indices.tolist()
    assert [lp for _, lp in top.top] == pytest.approx(ref.values.tolist())
    assert top.logprob == pytest.approx(float(ref.values[0]))  # raw: the bias/ban never changes logprobs


def test_repetition_penalty_through_sample_token_matches_hf_greedy():
    logits = logits_row(6)
    context = torch.topk(logits, 3).indices.tolist()  # the three best tokens were seen
    ref = transformers.RepetitionPenaltyLogitsProcessor(2.0)(torch.tensor([context]), logits[None].clone())[0]
    got = sample_token(logits, SamplingParams(temperature=0, repetition_penalty=2.0), context=context)
    assert got.token == int(ref.argmax())


@pytest.mark.parametrize(
    "field,value",
    [("n", 0), ("n", 129), ("presence_penalty", 2.5), ("frequency_penalty", float("nan")), ("top_logprobs", 21),
     ("prompt_logprobs", -1), ("logit_bias", {1: 101.0}), ("logit_bias", {-1: 1.0}), ("min_tokens", 300)],
)
def test_bad_serving_params_name_the_field(field, value):
    with pytest.raises(RequestError, match=field):
        SamplingParams(**{field: value})
