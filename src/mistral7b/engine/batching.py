"""One chunk of a batch of token sequences as padded [B, width] tensors, the shape every model call takes.

Rows shorter than the chunk are padded with position -1, which the attention mask and the cache ignore.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def padded_chunk(
    sequences: Sequence[Sequence[int]], start: int, width: int, offsets: Sequence[int] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """tokens and positions [B, width] for sequences[i][start : start + width]; row i's positions begin at
    offsets[i] + start (offsets default to 0: the sequences start at position 0)."""
    B = len(sequences)
    tokens = torch.zeros(B, width, dtype=torch.long)
    positions = torch.full((B, width), -1, dtype=torch.long)
    for i, seq in enumerate(sequences):
        piece = seq[start : start + width]
        if len(piece):
            base = start + (offsets[i] if offsets is not None else 0)
            tokens[i, : len(piece)] = torch.as_tensor(piece, dtype=torch.long)
            positions[i, : len(piece)] = torch.arange(base, base + len(piece))
    return tokens, positions
