"""Log-likelihoods of continuations, with the forward pass of a shared context done once.

Evaluation asks for many (context, continuation) pairs whose contexts repeat: a multiple-choice question
is one context with four or more answers, and the context (with its few-shot examples) is the long part.
So requests are grouped by context; each group's context is pre-filled once into the rolling-buffer cache
(one row per group, in chunks, as generation does), then the cache rows are copied to one row per
continuation and only the continuations are fed. The last context token is fed with the continuation,
because its logits predict the continuation's first token.

Groups go longest first (as lm-eval does), so a batch that does not fit in memory fails at once, and rows of
similar length share a batch. Everything here works on token ids: lm-eval's model and, later, the server's
`echo + logprobs` completions are thin layers over `score_pairs`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from mistral7b.engine.batching import padded_chunk
from mistral7b.cache import RollingKVCache
from mistral7b.errors import RequestError
from mistral7b.model.transformer import Transformer


@dataclass
class PairScore:
    logprob: float  # sum of log p(continuation token | everything before it)
    greedy: bool  # every continuation token was the argmax


def fit_pair(context: list[int], continuation: list[int], max_len: int) -> tuple[list[int], list[int]]:
    """Cut the context from the left so that context + continuation fits `max_len` + 1 tokens.

    The model reads at most `max_len` tokens and the last continuation token is only predicted, never read
    (lm-eval's rule). A continuation that cannot fit with at least one token of context is an error.
    """
    if not continuation:
        raise RequestError("a continuation must have at least one token")
    if len(continuation) > max_len:
        raise RequestError(f"a continuation of {len(continuation)} tokens does not fit the context of {max_len}")
    keep = max_len + 1 - len(continuation)
    return context[-keep:], continuation


def fork_cache(cache: RollingKVCache, rows: torch.Tensor) -> RollingKVCache:
    """A new cache whose row i is a copy of `cache` row rows[i] (keys, values and their positions)."""
    forked = RollingKVCache.__new__(RollingKVCache)
    forked.__dict__.update(cache.__dict__)
    forked.batch_size = int(rows.numel())
    rows = rows.to(cache.device)
    forked.k = [k.index_select(0, rows) for k in cache.k]
    forked.v = [v.index_select(0, rows) for v in cache.v]
    forked.slot_pos = cache.slot_pos.index_select(0, rows)
    return forked


def _feed(
    model: Transformer,
    cache: RollingKVCache,
    inputs: Sequence[Sequence[int]],
    starts: Sequence[int],
    chunk_size: int,
    targets: Sequence[Sequence[int]] | None,
) -> list[tuple[float, bool]]:
    """Feed inputs[i] at positions starts[i].. in chunks; score targets[i][t] from the logits of inputs[i][t]."""
    device = cache.device
    B, longest = len(inputs), max(len(x) for x in inputs)
    sums, greedy = [0.0] * B, [True] * B
    for lo in range(0, longest, chunk_size):
        width = min(chunk_size, longest - lo)
        tokens, positions = padded_chunk(inputs, lo, width, offsets=starts)
        if targets is None:  # pre-fill only: the cache is what we want, one logit row is the cheapest output
            model(tokens.to(device), positions.to(device), cache, logits_index=torch.zeros(1, dtype=torch.long, device=device))
            continue
        logp = model(tokens.to(device), positions.to(device), cache).log_softmax(-1)
        for i, y in enumerate(targets):
            want = y[lo : lo + width]
            if not want:
                continue
            rows = torch.arange(len(want), device=logp.device)
            ids = torch.tensor(want, device=logp.device)
            sums[i] += float(logp[i, rows, ids].sum())
            greedy[i] = greedy[i] and bool((logp[i, rows].argmax(-1) == ids).all())
    return list(zip(sums, greedy))


@torch.inference_mode()
def score_pairs(
    model: Transformer,
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    chunk_size: int,
    max_len: int,
    max_batch_size: int,
    progress: Callable[[int], None] | None = None,
) -> list[PairScore]:
    """log p(continuation | context) and greediness for each (context ids, continuation ids) pair.

    Contexts must be non-empty (lm-eval puts BOS there when a context is empty). `progress(n)` is called as
    n more pairs are done.
    """
    # The final norm's weight is in the compute dtype; the first parameter may be a bf16 embedding or packed
    # int4 weights of a quantized model.
    params = model.norm.weight
    fitted = []
    for ctx, cont in pairs:
        if not ctx:
            raise RequestError("a context must have at least one token (use BOS for an empty context)")
        fitted.append(fit_pair(list(ctx), list(cont), max_len))
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, (ctx, _) in enumerate(fitted):
        groups.setdefault(tuple(ctx), []).append(i)
    order = sorted(groups, key=lambda c: -(len(c) + max(len(fitted[i][1]) for i in groups[c])))
    results: list[PairScore | None] = [None] * len(fitted)
    for lo in range(0, len(order), max_batch_size):
        contexts = order[lo : lo + max_batch_size]
        cache = RollingKVCache(model.args, len(contexts), params.dtype, params.device)
        cache.reserve(max(len(c) + max(len(fitted[i][1]) for i in groups[c]) for c in contexts))
        if max(len(c) for c in contexts) > 1:
            _feed(model, cache, [c[:-1] for c in contexts], [0] * len(contexts), chunk_size, None)
        rows = [(g, i) for g, c in enumerate(contexts) for i in groups[c]]
        for r in range(0, len(rows), max_batch_size):
            part = rows[r : r + max_batch_size]
            forked = fork_cache(cache, torch.tensor([g for g, _ in part]))
            inputs = [[contexts[g][-1], *fitted[i][1][:-1]] for g, i in part]
            starts = [len(contexts[g]) - 1 for g, _ in part]
            scores = _feed(model, forked, inputs, starts, chunk_size, [fitted[i][1] for _, i in part])
            for (_, i), (lp, gr) in zip(part, scores):
                results[i] = PairScore(lp, gr)
            if progress is not None:
                progress(len(part))
    return results  # type: ignore[return-value]


def rolling_windows(tokens: Sequence[int], prefix: int, max_len: int, stride: int | None = None) -> list[tuple[list[int], list[int]]]:
    """(context, continuation) windows that predict every token of `tokens` once, from a `prefix` token.

    Each window reads at most `max_len` tokens. With stride = max_len (the default) windows are disjoint
    and each keeps one token of context, lm-eval's `loglikelihood_rolling` rule. A smaller stride gives every
    window max_len - stride tokens of extra context (lower, fairer perplexity, more compute).
    """
    stride = max_len if stride is None else stride
    if not 1 <= stride <= max_len:
        raise RequestError(f"stride must be in [1, {max_len}], got {stride}")
    seq = [prefix, *tokens]
    windows = []
    done = 0  # tokens of `tokens` already predicted; token j of `tokens` is seq[j + 1]
    while done < len(tokens):
        n = min(stride if done else max_len, len(tokens) - done)
        end = done + 1 + n  # seq[:end] holds everything up to the last token this window predicts
        begin = max(0, end - 1 - max_len)
        windows.append((seq[begin : done + 1], seq[done + 1 : end]))
        done += n
    return windows
