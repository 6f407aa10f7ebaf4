"""The generation loop over a static batch: chunked pre-fill of mixed-length prompts, then decode.

Each row of the batch is one request with its own positions; rows that are shorter or already finished are
padding (position -1) for that step, so every request gets exactly what it would get alone. Pre-fill walks
the prompts in chunks of `chunk_size` tokens through the rolling-buffer cache (the paper's chunking);
decode feeds one token per live row. Events stream out as tokens are made.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from mistral7b.cache import RollingKVCache
from mistral7b.engine.batching import padded_chunk
from mistral7b.engine.detokenizer import IncrementalDetokenizer
from mistral7b.engine.outputs import StreamEvent
from mistral7b.engine.sampler import sample_token
from mistral7b.engine.sampling_params import SamplingParams
from mistral7b.model.transformer import Transformer

if TYPE_CHECKING:
    from mistral7b.tokenizer import Tokenizer


@dataclass
class _Row:
    prompt: list[int]
    params: SamplingParams
    eos_ids: frozenset[int]
    detok: IncrementalDetokenizer | None
    generator: torch.Generator | None
    output: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str | None = None

    @property
    def length(self) -> int:
        return len(self.prompt) + len(self.output)


def _generator(seed: int | None) -> torch.Generator | None:
    if seed is None:
        return None
    g = torch.Generator()
    g.manual_seed(seed)
    return g


@torch.inference_mode()
def generate_stream(
    model: Transformer,
    tokenizer: Tokenizer | None,
    prompts: Sequence[Sequence[int]],
    params: Sequence[SamplingParams],
    chunk_size: int,
) -> Iterator[StreamEvent]:
    """Run all prompts together; yield one StreamEvent per new token, then one final event per request."""
    device = next(model.parameters()).device
    dtype = model.dtype
    eos = tokenizer.eos_ids if tokenizer is not None else frozenset()
    rows = [
        _Row(
            prompt=list(p),
            params=sp,
            eos_ids=frozenset() if sp.ignore_eos else eos,
            detok=IncrementalDetokenizer(tokenizer.decode, sp.stop) if tokenizer is not None else None,
            generator=_generator(sp.seed),
        )
        for p, sp in zip(prompts, params)
    ]
    cache = RollingKVCache(model.args, len(rows), dtype, device)
    cache.reserve(max(r.length + r.params.max_tokens for r in rows))

    last_logits = _prefill(model, cache, rows, chunk_size, device)
    live = list(range(len(rows)))
    while live:
        for i in live:
            row = rows[i]
            seen = (torch.tensor(row.prompt + row.output, dtype=torch.long)
                    if row.params.repetition_penalty != 1.0 else None)
            token, logprob = sample_token(last_logits[i], row.params, seen, row.generator)
            row.output.append(token)
            row.logprobs.append(logprob)
            yield _after_token(row, i, token, logprob)
        for i in live:
            if rows[i].finish_reason is not None:
                yield StreamEvent(i, None, _flush(rows[i]), None, rows[i].finish_reason)
        live = [i for i in live if rows[i].finish_reason is None]
        if not live:
            break
        tokens = torch.zeros(len(rows), 1, dtype=torch.long)
        positions = torch.full((len(rows), 1), -1, dtype=torch.long)
        for i in live:
            tokens[i, 0] = rows[i].output[-1]
            positions[i, 0] = rows[i].length - 1
        last_logits = model(tokens.to(device), positions.to(device), cache)[:, 0].cpu()


def _prefill(
    model: Transformer, cache: RollingKVCache, rows: list[_Row], chunk_size: int, device: torch.device
) -> torch.Tensor:
    """Feed every prompt in chunks; return the logits [B, vocab] at each prompt's last token."""
    B = len(rows)
    longest = max(len(r.prompt) for r in rows)
    last_logits = torch.empty(B, model.args.vocab_size)
    for start in range(0, longest, chunk_size):
        width = min(chunk_size, longest - start)
        tokens, positions = padded_chunk([r.prompt for r in rows], start, width)
        ends_here = torch.tensor([max(min(width, len(r.prompt) - start) - 1, 0) for r in rows])
        logits = model(tokens.to(device), positions.to(device), cache, logits_index=ends_here.to(device)).cpu()
        for i, r in enumerate(rows):
            if start < len(r.prompt) <= start + width:
                last_logits[i] = logits[i]
    return last_logits


def _after_token(row: _Row, index: int, token: int, logprob: float) -> StreamEvent:
    """Check the stop conditions for the token just sampled; return its event."""
    text = ""
    if token in row.eos_ids or token in row.params.stop_token_ids:
        row.finish_reason = "stop"
    elif row.detok is not None:
        text = row.detok.add(row.output)
        if row.detok.stopped:
            row.finish_reason = "stop"
    if row.finish_reason is None and len(row.output) >= row.params.max_tokens:
        row.finish_reason = "length"
    return StreamEvent(index, token, text, logprob if row.params.logprobs else None, None)


def _flush(row: _Row) -> str:
    return row.detok.flush() if row.detok is not None and not row.detok.stopped else ""
