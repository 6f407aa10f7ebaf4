"""Rotary position embeddings on absolute positions, in Mistral's native (interleaved pairs) layout.

Native checkpoints and GGUF store q/k rows so that dimensions (2i, 2i+1) form one rotating pair; Hugging Face
permutes rows into the half-split layout instead, and the loader undoes that. Angles are computed in float32
from the positions of each call, so any position (past the trained length, or far into a rolling buffer) is
exact and nothing position-dependent has to be precomputed or stored.
"""

from __future__ import annotations

import torch


def inv_frequencies(head_dim: int, theta: float, device: torch.device | str) -> torch.Tensor:
    """theta ** (-2i / head_dim) for i < head_dim / 2: the frequency of each rotating pair."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    return 1.0 / (theta**exponents)


def rotary_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of position * frequency, [B, T, head_dim/2] in float32; padding (-1) maps to position 0."""
    angles = positions.clamp(min=0).unsqueeze(-1).float() * inv_freq
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, T, H, head_dim] pairwise by the angles of cos/sin [B, T, head_dim/2]."""
    pairs = x.float().unflatten(-1, (-1, 2))
    x0, x1 = pairs[..., 0], pairs[..., 1]
    c, s = cos.unsqueeze(2), sin.unsqueeze(2)
    rotated = torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1)
    return rotated.flatten(-2).type_as(x)
