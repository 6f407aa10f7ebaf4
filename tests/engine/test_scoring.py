"""Scoring (prompt log-probabilities) equals a direct full forward pass, for any chunk size and batch mix."""

from __future__ import annotations

import pytest
import torch

from mistral7b.engine.scoring import score_tokens
from tests.conftest import hf_model, load_ours, tiny_args


@pytest.mark.parametrize("chunk", [1, 5, 6, 7, 40])
def test_scores_equal_hf_log_softmax(tmp_path, chunk):
    args = tiny_args(window=6)
    hf = hf_model(args, seed=8)
    hf.save_pretrained(tmp_path)
    ours = load_ours(str(tmp_path))
    g = torch.Generator().manual_seed(chunk)
    seqs = [torch.randint(0, args.vocab_size, (n,), generator=g).tolist() for n in (25, 2, 13)]
    scores = score_tokens(ours, seqs, chunk)
    for seq, sc in zip(seqs, scores):
        with torch.no_grad():
            logp = hf(torch.tensor([seq])).logits[0].log_softmax(-1)
        want = logp[torch.arange(len(seq) - 1), torch.tensor(seq[1:])]
        assert torch.allclose(torch.tensor(sc.logprobs), want, atol=1e-4)
        assert sc.greedy == (logp[:-1].argmax(-1) == torch.tensor(seq[1:])).tolist()
