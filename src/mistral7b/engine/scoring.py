"""Scoring as evaluation asks for it: (context, continuation) pairs cut to the context lm-eval allows, and a
document's rolling windows. The scores themselves are engine requests that generate nothing (`LLM.score`,
`LLM.score_pairs`: max_tokens 0 with prompt_logprobs from the continuation on), batched with anything else the
engine runs, through the paged kernels, CUDA graphs aside, and tensor parallelism; a context shared by several
continuations is pre-filled once through the prefix cache.
"""

from __future__ import annotations

from collections.abc import Sequence

from mistral7b.errors import RequestError


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


def rolling_windows(tokens: Sequence[int], prefix: int, max_len: int,
                    stride: int | None = None) -> list[tuple[list[int], list[int]]]:
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
