"""Log-likelihoods of a few short continuations after each of many prompts, sharing each prompt's pre-fill.

Scoring K candidate labels as K full sequences (`LLM.score`) repeats the prompt K times; the classification
prompt is a few hundred tokens and a label one to three, so that is K times the work for the same numbers.
Here each prompt is pre-filled once (the same chunked pre-fill as generation), its cache rows are copied K
times, and all candidates run in one batched step on top. The result equals `LLM.score` on the full
sequences (tests/moderation/test_candidates.py checks it), at 1/K of the cost.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mistral7b.engine.batching import padded_chunk
from mistral7b.cache import RollingKVCache
from mistral7b.model.transformer import Transformer


def _fork(cache: RollingKVCache, k: int) -> RollingKVCache:
    """Each row of the cache repeated k times (row i -> rows i*k .. i*k+k-1)."""
    cache.k = [t.repeat_interleave(k, dim=0) for t in cache.k]
    cache.v = [t.repeat_interleave(k, dim=0) for t in cache.v]
    cache.slot_pos = cache.slot_pos.repeat_interleave(k, dim=0)
    cache.batch_size *= k
    return cache


@torch.inference_mode()
def score_continuations(model: Transformer, prefixes: Sequence[Sequence[int]],
                        continuations: Sequence[Sequence[int]], chunk_size: int) -> list[list[float]]:
    """out[i][k] = log p(continuations[k] | prefixes[i]), the sum over the continuation's tokens."""
    device = next(model.parameters()).device
    dtype = model.dtype
    B, K = len(prefixes), len(continuations)
    if B == 0 or K == 0 or any(len(p) == 0 for p in prefixes) or any(len(c) == 0 for c in continuations):
        raise ValueError("score_continuations needs non-empty prefixes and continuations")
    longest, longest_cont = max(len(p) for p in prefixes), max(len(c) for c in continuations)
    cache = RollingKVCache(model.args, B, dtype, device)
    cache.reserve(longest + longest_cont)
    last = torch.zeros(B, model.args.vocab_size)  # log p(next token | whole prefix), per prefix
    for start in range(0, longest, chunk_size):
        width = min(chunk_size, longest - start)
        tokens, positions = padded_chunk(prefixes, start, width)
        ends = torch.tensor([len(p) - 1 - start for p in prefixes])
        inside = (ends >= 0) & (ends < width)
        flat = torch.arange(B) * width + ends.clamp(0, width - 1)  # each row's last prefix token in this chunk
        logits = model(tokens.to(device), positions.to(device), cache, logits_index=flat.to(device))
        last[inside] = logits[inside.to(device)].log_softmax(-1).cpu()

    logp = None
    if longest_cont > 1:  # later tokens of the candidates: one step over all (prefix, candidate) rows
        logp = _continue(model, _fork(cache, K), prefixes, continuations, device)
    out = []
    for i in range(B):
        row = []
        for k, c in enumerate(continuations):
            total = float(last[i, c[0]])
            for t in range(1, len(c)):
                total += float(logp[i * K + k, t - 1, c[t]])  # type: ignore[index]
            row.append(total)
        out.append(row)
    return out


def _continue(model: Transformer, cache: RollingKVCache, prefixes: Sequence[Sequence[int]],
              continuations: Sequence[Sequence[int]], device: torch.device) -> torch.Tensor:
    K, longest_cont = len(continuations), max(len(c) for c in continuations)
    B = len(prefixes)
    tokens = torch.zeros(B * K, longest_cont, dtype=torch.long)
    positions = torch.full((B * K, longest_cont), -1, dtype=torch.long)
    for i, p in enumerate(prefixes):
        for k, c in enumerate(continuations):
            tokens[i * K + k, : len(c)] = torch.tensor(c, dtype=torch.long)
            positions[i * K + k, : len(c)] = torch.arange(len(p), len(p) + len(c))
    return model(tokens.to(device), positions.to(device), cache).log_softmax(-1).cpu()
