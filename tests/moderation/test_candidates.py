"""Shared-prefix candidate scoring equals transformers' log-softmax on the full sequences, windows included."""

from __future__ import annotations

import pytest
import torch

from mistral7b.moderation.candidates import score_continuations
from tests.conftest import hf_model, load_ours, tiny_args


@pytest.mark.parametrize("chunk", [1, 5, 40])
def test_candidate_loglik_equals_hf_full_sequences(tmp_path, chunk):
    args = tiny_args(window=6)
    hf = hf_model(args, seed=5)
    hf.save_pretrained(tmp_path)
    ours = load_ours(str(tmp_path))
    g = torch.Generator().manual_seed(chunk)
    prefixes = [torch.randint(0, args.vocab_size, (n,), generator=g).tolist() for n in (25, 2, 13)]
    candidates = [[7], [9, 3], [11, 4, 100], [7, 7]]
    got = score_continuations(ours, prefixes, candidates, chunk)
    for i, p in enumerate(prefixes):
        for k, c in enumerate(candidates):
            seq = p + c
            with torch.no_grad():
                logp = hf(torch.tensor([seq])).logits[0].log_softmax(-1)
            want = sum(float(logp[len(p) - 1 + t, c[t]]) for t in range(len(c)))
            assert got[i][k] == pytest.approx(want, abs=1e-4), (i, k)


def test_empty_inputs_are_refused(tmp_path):
    args = tiny_args()
    hf_model(args).save_pretrained(tmp_path)
    ours = load_ours(str(tmp_path))
    with pytest.raises(ValueError):
        score_continuations(ours, [[1, 2]], [[]], 4)
    with pytest.raises(ValueError):
        score_continuations(ours, [[]], [[1]], 4)
