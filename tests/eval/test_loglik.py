"""Continuation scores with shared-context pre-fill equal one direct transformers forward pass per pair,
and rolling windows equal lm-eval's own windowing."""

from __future__ import annotations

import pytest
import torch
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from mistral7b.errors import RequestError
from mistral7b.eval.loglik import fit_pair, rolling_windows, score_pairs
from tests.conftest import hf_model, load_ours, tiny_args
from tests.eval.conftest import hf_logprob


@pytest.mark.parametrize("window,chunk,batch", [(6, 4, 2), (6, 6, 32), (None, 5, 3), (6, 1, 5)])
def test_pairs_equal_direct_forward(tmp_path, window, chunk, batch):
    args = tiny_args(window=window)
    hf = hf_model(args, seed=11)
    hf.save_pretrained(tmp_path)
    ours = load_ours(str(tmp_path))
    g = torch.Generator().manual_seed(chunk + batch)
    rand = lambda n: torch.randint(0, args.vocab_size, (n,), generator=g).tolist()  # noqa: E731
    contexts = [rand(n) for n in (1, 2, 9, 20)]  # 20 > 3 windows of 6: the ring wraps before the fork
    pairs = [(c, rand(k)) for c in contexts for k in (1, 3, 8)]
    pairs += [(contexts[2], pairs[0][1])]  # the same continuation after another context
    scores = score_pairs(ours, pairs, chunk_size=chunk, max_len=4096, max_batch_size=batch)
    for (ctx, cont), got in zip(pairs, scores):
        want, greedy = hf_logprob(hf, ctx, cont)
        assert got.logprob == pytest.approx(want, abs=1e-3)
        assert got.greedy == greedy


def test_greedy_flag_is_true_for_the_models_own_continuation(tmp_path):
    args = tiny_args(window=6)
    hf = hf_model(args, seed=5)
    hf.save_pretrained(tmp_path)
    ours = load_ours(str(tmp_path))
    ctx = [3, 17, 29, 41, 5, 9, 77]
    with torch.no_grad():
        full = hf.generate(torch.tensor([ctx]), max_new_tokens=6, do_sample=False)[0].tolist()
    cont = full[len(ctx):]
    wrong = cont[:-1] + [(cont[-1] + 1) % args.vocab_size]
    right, off = score_pairs(ours, [(ctx, cont), (ctx, wrong)], chunk_size=4, max_len=64, max_batch_size=4)
    assert right.greedy and not off.greedy
    assert right.logprob > off.logprob


def test_long_context_is_cut_from_the_left(tmp_path):
    args = tiny_args(window=None)
    hf = hf_model(args, seed=2)
    hf.save_pretrained(tmp_path)
    ours = load_ours(str(tmp_path))
    ctx, cont = list(range(1, 31)), [40, 41, 42]
    (got,) = score_pairs(ours, [(ctx, cont)], chunk_size=7, max_len=10, max_batch_size=1)
    want, _ = hf_logprob(hf, ctx[-8:], cont)  # 10 + 1 tokens: 8 of context, 3 of continuation
    assert got.logprob == pytest.approx(want, abs=1e-3)
    assert fit_pair(ctx, cont, 10) == (ctx[-8:], cont)
    with pytest.raises(RequestError, match="does not fit"):
        fit_pair(ctx, list(range(11)), 10)
    with pytest.raises(RequestError, match="at least one token"):
        score_pairs(ours, [([], cont)], chunk_size=7, max_len=10, max_batch_size=1)


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
