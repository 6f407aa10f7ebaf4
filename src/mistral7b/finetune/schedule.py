"""What each optimizer step sees, as pure functions of (seed, step): its rows and its learning rate.

Keeping both stateless is what makes `--resume` exact: a resumed run recomputes the same rows and the same
learning rate for step s as the uninterrupted run did, with nothing to restore but the step number.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from mistral7b.finetune.data import IGNORE, Example, Row, epoch_rows


def lr_at(step: int, base_lr: float, warmup: int, total: int, min_ratio: float = 0.1) -> float:
    """Linear warmup over `warmup` steps, then cosine decay to min_ratio * base_lr at `total` (step is 0-based)."""
    if warmup > 0 and step < warmup:
        return base_lr * (step + 1) / warmup
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    return base_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def empty_row(seq_len: int) -> Row:
    """A row with no tokens and no loss: fills a rank's share of a short final step."""
    return Row([0] * seq_len, [IGNORE] * seq_len, [-1] * seq_len, [-1] * seq_len)


class RowStream:
    """Epoch after epoch of packed rows; step s takes rows [s*G, (s+1)*G) of the stream."""

    def __init__(self, examples: Sequence[Example], seq_len: int, seed: int, rows_per_step: int, epochs: int,
                 max_steps: int | None):
        self.examples, self.seq_len, self.seed, self.G = examples, seq_len, seed, rows_per_step
        self._epochs: list[list[Row]] = []
        if max_steps is not None:
            self.total_steps = max_steps
        else:
            rows = sum(len(self._epoch(e)) for e in range(epochs))
            self.total_steps = math.ceil(rows / rows_per_step)
        self.stream_len = None if max_steps is not None else sum(len(self._epoch(e)) for e in range(epochs))

    def _epoch(self, e: int) -> list[Row]:
        while len(self._epochs) <= e:
            self._epochs.append(epoch_rows(self.examples, self.seq_len, self.seed, len(self._epochs)))
        return self._epochs[e]

    def rows(self, step: int) -> tuple[list[Row], int]:
        """(rows of `step`, epoch the step starts in)."""
        lo, hi = step * self.G, (step + 1) * self.G
        if self.stream_len is not None:
            hi = min(hi, self.stream_len)
        out: list[Row] = []
        start, e, first_epoch = 0, 0, None
        while start < hi:
            ep = self._epoch(e)
            a, b = max(lo, start), min(hi, start + len(ep))
            if a < b:
                first_epoch = e if first_epoch is None else first_epoch
                out.extend(ep[a - start : b - start])
            start += len(ep)
            e += 1
        return out, first_epoch or 0
