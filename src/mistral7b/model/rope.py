"""Rotary position embeddings on absolute positions, in Mistral's native (interleaved pairs) layout.

Native checkpoints and GGUF store q/k rows so that dimensions (2i, 2i+1) form one rotating pair; Hugging Face
permutes rows into the half-split layout instead, and the loader undoes that. Each pair is rotated as one
complex multiplication. Angles are computed in float32 from the positions of each call, so any position (past
the trained length, or far into a rolling buffer) is exact and nothing position-dependent is stored.
"""

from __future__ import annotations

import torch


def inv_frequencies(head_dim: int, theta: float, device: torch.device | str) -> torch.Tensor:
    """theta ** (-2i / head_dim) for i < head_dim / 2: the frequency of each rotating pair."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    return 1.0 / (theta**exponents)


def rotary_freqs(positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """exp(i * position * frequency) as complex64 [B, T, 1, head_dim/2]; padding (-1) maps to position 0."""
    angles = positions.clamp(min=0).unsqueeze(-1).float() * inv_freq
    return torch.polar(torch.ones_like(angles), angles).unsqueeze(2)


def apply_rotary(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, T, H, head_dim] pairwise by freqs [B, T, 1, head_dim/2] (complex)."""
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(pairs * freqs).flatten(-2).type_as(x)
