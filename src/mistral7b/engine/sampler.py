"""Turn one row of logits into the next token: penalties, temperature, top-k, top-p, min-p, then a draw.

Log-probabilities reported to the user are those of the model's raw distribution (before penalties and
truncation), as vLLM reports them, so they are comparable across sampling settings.
"""

from __future__ import annotations

import torch

from mistral7b.engine.sampling_params import SamplingParams


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor | None, penalty: float) -> torch.Tensor:
    """CTRL-style penalty (as in HF and vLLM): shrink logits of tokens already in prompt or output."""
    if penalty == 1.0 or seen is None or seen.numel() == 0:
        return logits
    picked = logits[seen]
    logits = logits.clone()
    logits[seen] = torch.where(picked > 0, picked / penalty, picked * penalty)
    return logits


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature-scaled logits with everything outside top-k / top-p / min-p set to -inf."""
    logits = logits / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the tokens before it already cover top_p; the first token always stays.
        drop_sorted = probs.cumsum(-1) - probs >= params.top_p
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    if params.min_p > 0.0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < params.min_p * probs.max(), float("-inf"))
    return logits


def sample_token(
    logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None, generator: torch.Generator | None
) -> tuple[int, float | None]:
    """Pick the next token from logits [vocab] (float32); return it with its raw log-probability when the
    request asks for log-probabilities (None otherwise: a log-softmax over the vocabulary per token is not free).
    `seen` (prompt + output ids) is needed only with a repetition penalty."""
    processed = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.greedy:
        token = int(processed.argmax())
    else:
        probs = filter_logits(processed, params).softmax(-1)
        token = int(torch.multinomial(probs, 1, generator=generator))
    logprob = float(logits.log_softmax(-1)[token]) if params.logprobs else None
    return token, logprob
