"""GGUF's block-quantized matrices (Q4_0, Q4_1, Q8_0) read as integers, scales and zeros instead of floats.

A block covers 32 weights of one row. Q8_0: an f16 scale d and 32 int8 values, w = d * q. Q4_0 / Q4_1: an
f16 scale d (Q4_1 adds an f16 minimum m) then 16 bytes whose low nibbles are weights 0..15 and high nibbles
weights 16..31; w = d * (q - 8) and w = d * q + m. All three are w = value * scale + zero with a small integer
value (Q4_0: q * d - 8 d, the same float as d * (q - 8) since q * d and 8 d are exact), the form of our int4
layer (model/quantize.py) and of a quantized embedding lookup, so the file's weights can be used exactly
instead of being dequantized to float at load.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

BLOCK = 32
_BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}
PACKABLE = frozenset(_BLOCK_BYTES)


@dataclass
class GGUFBlocks:
    """A GGUF block-quantized matrix: w = values * scales + zeros, per block of 32 along a row.

    values [N, K] int8 (Q4: q in 0..15; Q8_0: -128..127), scales and zeros [N, K / 32] float32 (Q4_0: zero =
    -8 d; Q4_1: zero = m; Q8_0: 0).
    """

    kind: str
    values: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.values.shape)

    def dequantize(self, lo: int = 0, hi: int | None = None) -> torch.Tensor:
        """Float32 weights of rows lo..hi (all rows by default)."""
        values, scales, zeros = self.values[lo:hi], self.scales[lo:hi], self.zeros[lo:hi]
        N, K = values.shape
        w = values.reshape(N, K // BLOCK, BLOCK).float() * scales[..., None] + zeros[..., None]
        return w.reshape(N, K)


def read_blocks(raw: np.ndarray, kind: str, rows: int, cols: int) -> GGUFBlocks:
    """raw: the tensor's bytes (any shape, row-major), kind Q4_0, Q4_1 or Q8_0."""
    nbytes = _BLOCK_BYTES[kind]
    blocks = np.ascontiguousarray(raw).reshape(rows, cols // BLOCK, nbytes)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    if kind == "Q8_0":
        zeros = np.zeros_like(d)
        values = blocks[..., 2:].copy().view(np.int8).reshape(rows, cols)
    else:
        zeros = -8.0 * d  # Q4_0
        start = 2
        if kind == "Q4_1":
            zeros = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
            start = 4
        qs = blocks[..., start:]
        values = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).reshape(rows, cols).astype(np.int8)
    return GGUFBlocks(kind, torch.from_numpy(values), torch.from_numpy(d), torch.from_numpy(zeros))
