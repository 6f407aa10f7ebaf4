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
    """Epoch after epoch of packed rows, each epoch cut into steps of G rows (its last step takes what is left):
    a step never mixes epochs, as Hugging Face's Trainer's never does. A dataset smaller than a step (20 short
    chats: one row of ~800 tokens) is one step of one row an epoch, not the same rows G times in one step."""

    def __init__(self, examples: Sequence[Example], seq_len: int, seed: int, rows_per_step: int, epochs: int,
                 max_steps: int | None):
        self.examples, self.seq_len, self.seed, self.G = examples, seq_len, seed, rows_per_step
        self._epochs: list[list[Row]] = []
        self.epochs = None if max_steps is not None else epochs  # None: as many as max_steps takes
        if max_steps is not None:
            self.total_steps = max_steps
        else:
            self.total_steps = sum(self._steps_in(e) for e in range(epochs))

    def _epoch(self, e: int) -> list[Row]:
        while len(self._epochs) <= e:
            self._epochs.append(epoch_rows(self.examples, self.seq_len, self.seed, len(self._epochs)))
        return self._epochs[e]

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps in the first epoch (epochs differ by a step at most: their packing differs)."""
        return self._steps_in(0)

    def _steps_in(self, e: int) -> int:
        return max(1, math.ceil(len(self._epoch(e)) / self.G))

    def rows(self, step: int) -> tuple[list[Row], int]:
        """(rows of `step`, the epoch it belongs to); no rows past the last epoch."""
        e = 0
        while step >= self._steps_in(e):
            step -= self._steps_in(e)
            e += 1
            if self.epochs is not None and e >= self.epochs:
                return [], e
        return self._epoch(e)[step * self.G : (step + 1) * self.G], e
