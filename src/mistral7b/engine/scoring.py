"""Log-likelihoods of given tokens (no sampling): the primitive behind evaluation and moderation.

Each sequence is fed through the same chunked pre-fill as generation (so windows and chunking behave the
same), and for every position t >= 1 we keep log p(token_t | tokens_<t) and whether token_t was the
model's greedy choice. Log-softmax is taken chunk by chunk, so memory stays at one chunk of logits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mistral7b.cache import RollingKVCache
from mistral7b.engine.batching import padded_chunk
from mistral7b.model.transformer import Transformer


@dataclass
class TokenScores:
    token_ids: list[int]
    logprobs: list[float]  # logprobs[t-1] = log p(token_ids[t] | token_ids[:t]), for t >= 1
    greedy: list[bool]  # greedy[t-1]: token_ids[t] was the argmax


@torch.inference_mode()
def score_tokens(model: Transformer, sequences: Sequence[Sequence[int]], chunk_size: int) -> list[TokenScores]:
    device = next(model.parameters()).device
    dtype = model.dtype
    B = len(sequences)
    longest = max(len(s) for s in sequences)
    cache = RollingKVCache(model.args, B, dtype, device)
    cache.reserve(longest)
    logprobs = [[0.0] * (len(s) - 1) for s in sequences]
    greedy = [[False] * (len(s) - 1) for s in sequences]
    for start in range(0, longest, chunk_size):
        width = min(chunk_size, longest - start)
        tokens, positions = padded_chunk(sequences, start, width)
        logp = model(tokens.to(device), positions.to(device), cache).log_softmax(-1)
        best = logp.argmax(-1).cpu()
        for i, s in enumerate(sequences):
            # Logits at position p predict token p+1.
            first, last = start, min(start + width, len(s) - 1)
            if first >= last:
                continue
            nxt = torch.tensor(s[first + 1 : last + 1], dtype=torch.long)
            rows = torch.arange(0, last - first)
            picked = logp[i, rows.to(device), nxt.to(device)].cpu().tolist()
            logprobs[i][first:last] = picked
            greedy[i][first:last] = (best[i, rows] == nxt).tolist()
    return [TokenScores(list(s), lp, g) for s, lp, g in zip(sequences, logprobs, greedy)]
