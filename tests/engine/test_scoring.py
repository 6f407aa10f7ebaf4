"""Scoring through the engine (`LLM.score`, `LLM.score_pairs`: requests that generate nothing) against Hugging
Face's full forward pass on the same weights, for chunk sizes around the window and shared contexts; and the
pairs and windows lm-eval's rules make (engine/scoring.py)."""

from __future__ import annotations

import pytest
import torch
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from mistral7b.engine.llm import LLM
from mistral7b.engine.scoring import fit_pair, rolling_windows
from mistral7b.errors import RequestError
from tests.conftest import hf_model, tiny_args
from tests.eval.conftest import hf_logprob


def llm_for(tmp_path, window, seed, chunk, **kw):
    args = tiny_args(window=window)
    hf = hf_model(args, seed=seed)
    hf.save_pretrained(tmp_path)
    return hf, LLM(str(tmp_path), progress=False, dtype="float32", chunk_size=chunk, max_model_len=256, **kw)


@pytest.mark.parametrize("chunk", [1, 5, 6, 7, 40])
def test_scores_equal_hf_log_softmax(tmp_path, chunk):
    hf, llm = llm_for(tmp_path, 6, 8, chunk)
    g = torch.Generator().manual_seed(chunk)
    seqs = [torch.randint(0, hf.config.vocab_size, (n,), generator=g).tolist() for n in (25, 2, 13, 1)]
    scores = llm.score(seqs)
    assert scores[3].token_ids == seqs[3] and scores[3].logprobs == [] == scores[3].greedy
    for seq, sc in zip(seqs[:3], scores):
        with torch.no_grad():
            logp = hf(torch.tensor([seq])).logits[0].log_softmax(-1)
        want = logp[torch.arange(len(seq) - 1), torch.tensor(seq[1:])]
        assert sc.token_ids == seq and len(sc.logprobs) == len(seq) - 1
        assert torch.allclose(torch.tensor(sc.logprobs), want, atol=1e-4)
        assert sc.greedy == (logp[:-1].argmax(-1) == torch.tensor(seq[1:])).tolist()


@pytest.mark.parametrize("window,chunk,batch", [(6, 4, 2), (6, 6, 32), (None, 5, 3), (6, 1, 5)])
def test_pairs_equal_direct_forward(tmp_path, window, chunk, batch):
    hf, llm = llm_for(tmp_path, window, 11, chunk, max_batch_size=batch)
    g = torch.Generator().manual_seed(chunk + batch)
    rand = lambda n: torch.randint(0, hf.config.vocab_size, (n,), generator=g).tolist()  # noqa: E731
    contexts = [rand(n) for n in (1, 2, 9, 20)]  # 20 > 3 windows of 6
    pairs = [(c, rand(k)) for c in contexts for k in (1, 3, 8)]
    pairs += [(contexts[2], pairs[0][1])]  # the same continuation after another context
    hits = llm.engine.blocks.prefix_hits
    scores = llm.score_pairs(pairs)
    for (ctx, cont), got in zip(pairs, scores):
        want, greedy = hf_logprob(hf, ctx, cont)
        assert got.logprob == pytest.approx(want, abs=1e-4)
        assert got.greedy == greedy
    assert llm.engine.blocks.prefix_hits > hits  # later continuations of a context reuse its pre-fill


def test_greedy_flag_is_true_for_the_models_own_continuation(tmp_path):
    hf, llm = llm_for(tmp_path, 6, 5, 4)
    ctx = [3, 17, 29, 41, 5, 9, 77]
    with torch.no_grad():
        full = hf.generate(torch.tensor([ctx]), max_new_tokens=6, do_sample=False)[0].tolist()
    cont = full[len(ctx):]
    wrong = cont[:-1] + [(cont[-1] + 1) % hf.config.vocab_size]
    right, off = llm.score_pairs([(ctx, cont), (ctx, wrong)])
    assert right.greedy and not off.greedy
    assert right.logprob > off.logprob


def test_long_context_is_cut_from_the_left_and_the_last_token_is_only_predicted(tmp_path):
    hf, llm = llm_for(tmp_path, None, 2, 7)
    ctx, cont = list(range(1, 31)), [40, 41, 42]
    (got,) = llm.score_pairs([(ctx, cont)], max_len=10)
    want, _ = hf_logprob(hf, ctx[-8:], cont)  # 10 + 1 tokens: 8 of context, 3 of continuation
    assert got.logprob == pytest.approx(want, abs=1e-4)
    assert fit_pair(ctx, cont, 10) == (ctx[-8:], cont)
    full = [t % 128 for t in range(1, 258)]  # max_model_len + 1 tokens: the last is predicted, never read
    (whole,) = llm.score_pairs([(full[:200], full[200:])])
    want, _ = hf_logprob(hf, full[:200], full[200:])
    assert whole.logprob == pytest.approx(want, abs=1e-4)
    with pytest.raises(RequestError, match="does not fit"):
        fit_pair(ctx, list(range(11)), 10)
    with pytest.raises(RequestError, match="at least one token"):
        llm.score_pairs([([], cont)])


def test_scoring_runs_beside_generation(tmp_path):
    """A scoring request interleaves with generation in the one engine: both answers equal their answers alone."""
    from mistral7b.engine.sampling_params import SamplingParams

    hf, llm = llm_for(tmp_path, 6, 3, 5)
    prompt = list(range(5, 40))
    params = SamplingParams(max_tokens=12, temperature=0.0)
    alone = llm.generate({"prompt_token_ids": prompt}, params)[0].outputs[0].token_ids
    engine = llm.engine
    engine.add_request("gen", prompt, params)
    engine.add_request("score", prompt + alone, SamplingParams(max_tokens=0, prompt_logprobs=0,
                                                               prompt_logprobs_from=len(prompt)))
    got, scored = [], None
    while engine.has_unfinished():
        for e in engine.step():
            if e.request_id == "gen" and e.token_id is not None:
                got.append(e.token_id)
            if e.request_id == "score" and e.finish_reason is not None:
                scored = e
    assert got == alone and scored.token_id is None and scored.finish_reason == "length"
    assert all(entry is None for entry in scored.prompt_logprobs[: len(prompt)])
    assert all(rank == 1 for rank in scored.prompt_ranks[len(prompt):])  # greedy tokens: each the most likely


@pytest.mark.parametrize("n,max_len", [(1, 4), (4, 4), (5, 4), (23, 4), (23, 7), (100, 16), (3, 1)])
def test_disjoint_windows_equal_lm_evals(n, max_len):
    tokens = list(range(100, 100 + n))
    theirs = [make_disjoint_window(w) for w in get_rolling_token_windows(tokens, 1, max_len, 1)]
    assert rolling_windows(tokens, 1, max_len) == [(list(c), list(t)) for c, t in theirs]


@pytest.mark.parametrize("n,max_len,stride", [(23, 8, 3), (23, 8, 8), (9, 8, 1), (40, 5, 2)])
def test_strided_windows_predict_each_token_once_with_full_context(n, max_len, stride):
    tokens = list(range(100, 100 + n))
    windows = rolling_windows(tokens, 1, max_len, stride)
    assert [t for _, cont in windows for t in cont] == tokens
    for ctx, cont in windows:
        read = len(ctx) + len(cont) - 1
        assert read <= max_len
        assert read == max_len or ctx[0] == 1  # full windows, except those that start at the prefix
    with pytest.raises(RequestError, match="stride"):
        rolling_windows(tokens, 1, max_len, max_len + 1)
