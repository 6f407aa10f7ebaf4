"""Turn one row of logits into the next token: bias, bans, penalties, temperature, top-k, top-p, min-p, a draw.

Log-probabilities reported to the user are those of the model's raw distribution (before penalties and
truncation), as vLLM reports them, so they are comparable across sampling settings.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mistral7b.engine.sampling_params import SamplingParams


@dataclass
class Sample:
    token: int
    logprob: float | None = None  # raw log-probability of `token`, when the request asks for logprobs
    top: list[tuple[int, float]] | None = None  # the top_logprobs most likely (token, log-probability)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor | None, penalty: float) -> torch.Tensor:
    """CTRL-style penalty (as in HF and vLLM): shrink logits of tokens already in prompt or output."""
    if penalty == 1.0 or seen is None or seen.numel() == 0:
        return logits
    picked = logits[seen]
    logits = logits.clone()
    logits[seen] = torch.where(picked > 0, picked / penalty, picked * penalty)
    return logits


def apply_presence_frequency(logits: torch.Tensor, output: Sequence[int], presence: float,
                             frequency: float) -> torch.Tensor:
    """OpenAI's penalties over generated tokens: logit -= presence * [count > 0] + frequency * count."""
    if (presence == 0.0 and frequency == 0.0) or not output:
        return logits
    counts = torch.bincount(torch.as_tensor(output, dtype=torch.long), minlength=logits.shape[-1]).to(logits.dtype)
    return logits - presence * (counts > 0).to(logits.dtype) - frequency * counts


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


def top_logprobs(logprobs: torch.Tensor, k: int) -> list[tuple[int, float]]:
    """The k most likely (token, log-probability) pairs of a log-softmaxed row."""
    values, ids = logprobs.topk(min(k, logprobs.shape[-1]))
    return list(zip(ids.tolist(), values.tolist()))


def sample_token(
    logits: torch.Tensor,
    params: SamplingParams,
    *,
    context: Sequence[int] = (),
    output: Sequence[int] = (),
    banned: Sequence[int] = (),
    generator: torch.Generator | None = None,
) -> Sample:
    """Pick the next token from logits [vocab] (float32).

    `context` (prompt + output ids) feeds the repetition penalty, `output` the presence/frequency penalties;
    `banned` ids can never be drawn (EOS before min_tokens). The raw log-probability (and the top ones) are
    computed only when asked for: a log-softmax over the vocabulary per token is not free.
    """
    processed = logits
    if params.logit_bias:
        ids = torch.tensor([t for t in params.logit_bias if t < logits.shape[-1]], dtype=torch.long)
        bias = torch.tensor([params.logit_bias[t] for t in ids.tolist()], dtype=logits.dtype)
        processed = processed.index_add(0, ids.to(logits.device), bias.to(logits.device))
    if banned:
        processed = processed.index_fill(0, torch.as_tensor(list(banned), device=logits.device), float("-inf"))
    if params.repetition_penalty != 1.0 and context:
        processed = apply_repetition_penalty(processed, torch.as_tensor(context, device=logits.device),
                                             params.repetition_penalty)
    processed = apply_presence_frequency(processed, output, params.presence_penalty, params.frequency_penalty)
    if params.greedy:
        token = int(processed.argmax())
    else:
        probs = filter_logits(processed, params).softmax(-1)
        token = int(torch.multinomial(probs, 1, generator=generator))
    sample = Sample(token)
    if params.logprobs or params.top_logprobs:
        logprobs = logits.log_softmax(-1)
        sample.logprob = float(logprobs[token])
        if params.top_logprobs:
            sample.top = top_logprobs(logprobs, params.top_logprobs)
    return sample
