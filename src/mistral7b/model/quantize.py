"""Weight-only quantized linear layers on PyTorch's packed int8/int4 matmul kernels.

Decoding one token reads every weight once, so on a CPU (and a GPU at batch 1) its speed is set by weight
bytes: int8 halves bf16 and int4 quarters it. Activations stay in float; only weights are quantized.
The packed kernels cost about the same per input row whatever the row count; a dense bf16 matmul
(AMX/AVX512-BF16) costs far less per row but needs the weight dequantized first, which costs as much as a few
dozen packed rows for int8 and a couple of hundred for int4 (unpacking nibbles). So a batch of decodes
(a few to a few dozen rows) uses the packed kernel and a pre-fill chunk dequantizes on the fly and calls
F.linear; the row counts where the two meet were measured on a 2-core AVX-512 machine (bench/README.md).
The CPU kernels are fast only with bfloat16 activations: quantized models compute in bfloat16 by default.

- `Int8Linear`: symmetric per-output-channel int8, `torch._weight_int8pack_mm`.
- `Int4Linear`: asymmetric int4 in groups along the input dimension, dequantized as
  w = (q - 8) * scale + zero, which is exactly how GGUF's Q4_0 (zero = 0) and Q4_1 (zero = min + 8 * scale)
  blocks of 32 decode, so those files load into it without any re-quantization error.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

INT4_GROUP_SIZES = (32, 64, 128, 256)
INT8_DENSE_MIN_ROWS = 48  # from this many input rows on, dequantize and use a dense matmul
INT4_DENSE_MIN_ROWS = 192


class Int8Linear(nn.Module):
    def __init__(self, weight_int8: torch.Tensor, scales: torch.Tensor):
        super().__init__()
        self.in_features, self.out_features = weight_int8.shape[1], weight_int8.shape[0]
        self.register_buffer("weight_int8", weight_int8)
        self.register_buffer("scales", scales)

    @classmethod
    def from_float(cls, weight: torch.Tensor, dtype: torch.dtype) -> Int8Linear:
        return cls.from_rows(weight.shape[0], lambda lo, hi: weight[lo:hi], dtype)

    @classmethod
    def from_rows(cls, n_rows: int, rows: Callable[[int, int], torch.Tensor], dtype: torch.dtype,
                  chunk: int = 4096) -> Int8Linear:
        """Quantize a weight given by row ranges, a chunk at a time, so no full-size float temporary exists."""
        qs, all_scales = [], []
        for lo in range(0, n_rows, chunk):
            w = rows(lo, min(lo + chunk, n_rows)).float()
            scales = w.abs().amax(dim=1).clamp(min=1e-10) / 127.0
            qs.append(torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8))
            all_scales.append(scales)
        return cls(torch.cat(qs), torch.cat(all_scales).to(dtype))

    def dequantize(self) -> torch.Tensor:
        return self.weight_int8.float() * self.scales.float()[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        buffers = self._buffers  # read once: nn.Module's __getattr__ costs ~0.5 us a buffer (see Int4Linear)
        weight, scales = buffers["weight_int8"], buffers["scales"]
        if scales.dtype != x.dtype:
            scales = scales.to(x.dtype)
        if flat.shape[0] >= INT8_DENSE_MIN_ROWS:
            return F.linear(x, weight.to(x.dtype) * scales[:, None])
        out = torch._weight_int8pack_mm(flat, weight, scales)
        return out.view(*x.shape[:-1], self.out_features)


TILE_ROWS = 64  # the CPU int4 layout: per tile of 64 rows, per column k, 32 bytes = rows (j, j + 32)


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack([packed & 15, packed >> 4], dim=-1).reshape(packed.shape[0], -1)


def _pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack q [N, K] (int32 values 0..15) in the layout the device's int4 kernel wants."""
    if q.device.type == "cpu":
        return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
    pairs = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)
    return torch.ops.aten._convert_weight_to_int4pack(pairs, 8)


class Int4Linear(nn.Module):
    def __init__(self, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                 dtype: torch.dtype):
        """q [N, K] integer values in 0..15; scales/zeros [N, K // group_size]."""
        super().__init__()
        N, K = q.shape
        if group_size not in INT4_GROUP_SIZES or K % group_size:
            raise ValueError(f"int4 needs in_features ({K}) to be a multiple of group size {group_size}")
        self.in_features, self.out_features, self.group_size = K, N, group_size
        self.register_buffer("weight_int4", _pack_int4(q))
        # For the dense pre-fill path the weights are unpacked on the fly; where the packed layout cannot be
        # read back (GPU, or rows not in whole CPU tiles) the nibbles are also kept in plain row order.
        readable = q.device.type == "cpu" and N % TILE_ROWS == 0
        self.register_buffer("weight_nibbles", None if readable else (q[:, 0::2] | q[:, 1::2] << 4).to(torch.uint8))
        self.register_buffer("scales_and_zeros", torch.stack([scales, zeros], dim=-1).transpose(0, 1)
                             .contiguous().to(dtype))

    @classmethod
    def from_float(cls, weight: torch.Tensor, group_size: int, dtype: torch.dtype) -> Int4Linear:
        N, K = weight.shape
        w = weight.float().reshape(N, K // group_size, group_size)
        lo, hi = w.amin(dim=-1), w.amax(dim=-1)
        scales = ((hi - lo) / 15.0).clamp(min=1e-10)
        q = torch.round((w - lo[..., None]) / scales[..., None]).clamp(0, 15).to(torch.int32).reshape(N, K)
        return cls(q, scales, lo + 8.0 * scales, group_size, dtype)

    def values(self) -> torch.Tensor:
        """The 4-bit values q [N, K] (0..15) in natural order."""
        N, K = self.out_features, self.in_features
        if self.weight_nibbles is not None:
            return _nibbles(self.weight_nibbles).reshape(N, K)
        b = self.weight_int4.reshape(N // TILE_ROWS, K, TILE_ROWS // 2)
        tiles = torch.cat([b & 15, b >> 4], dim=2)  # [tiles, K, 64]: low nibbles rows 0..31, high 32..63
        return tiles.transpose(1, 2).reshape(N, K)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        N, K, G = self.out_features, self.in_features, self.group_size
        q = self.values().reshape(N, K // G, G).to(dtype) - 8
        scales, zeros = self.scales_and_zeros.to(dtype).transpose(0, 1).unbind(-1)
        return (q * scales[..., None] + zeros[..., None]).reshape(N, K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        if flat.shape[0] >= INT4_DENSE_MIN_ROWS:
            return F.linear(x, self.dequantize(x.dtype))
        # Buffers read once from the dict: nn.Module's __getattr__ costs ~0.5 us a buffer on the 2-core dev
        # machine, and a decoded token runs 120 of these (4 a layer) at ~20 us each.
        buffers = self._buffers
        sz = buffers["scales_and_zeros"]
        if sz.dtype != x.dtype:
            sz = sz.to(x.dtype)
        matmul = torch.ops.aten._weight_int4pack_mm_for_cpu if x.is_cpu else torch.ops.aten._weight_int4pack_mm
        out = matmul(flat, buffers["weight_int4"], self.group_size, sz)
        return out.view(*x.shape[:-1], self.out_features)


class QuantizedEmbedding(nn.Module):
    """An embedding table stored as int8 values with a scale and zero per block of 32: w = v * scale + zero.

    Only the looked-up rows are dequantized, so a GGUF Q8_0/Q4 table is used exactly at a quarter (or less)
    of the float32 memory.
    """

    def __init__(self, values: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, dtype: torch.dtype):
        super().__init__()
        self.num_embeddings, self.embedding_dim = values.shape
        self.block = self.embedding_dim // scales.shape[1]
        self.register_buffer("values", values if values.dtype == torch.int8 else values.to(torch.int8))
        self.register_buffer("scales", scales.float())
        self.register_buffer("zeros", zeros.float())
        self.dtype = dtype

    @classmethod
    def from_float(cls, weight: torch.Tensor, dtype: torch.dtype, block: int = 32) -> QuantizedEmbedding:
        V, D = weight.shape
        if D % block:
            block = D
        w = weight.float().reshape(V, D // block, block)
        scales = w.abs().amax(-1).clamp(min=1e-10) / 127.0
        values = torch.round(w / scales[..., None]).clamp(-127, 127).to(torch.int8).reshape(V, D)
        return cls(values, scales, torch.zeros_like(scales), dtype)

    def dequantize(self) -> torch.Tensor:
        V, D = self.values.shape
        w = self.values.reshape(V, -1, self.block).float() * self.scales[..., None] + self.zeros[..., None]
        return w.reshape(V, D)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        v = self.values[tokens].reshape(*tokens.shape, -1, self.block).float()
        w = v * self.scales[tokens][..., None] + self.zeros[tokens][..., None]
        return w.flatten(-2).to(self.dtype)


def quantize_linear(weight: torch.Tensor, mode: str, dtype: torch.dtype, group_size: int = 32) -> nn.Module:
    """A quantized replacement for nn.Linear(weight) (no bias); falls back to int8 where int4 cannot apply."""
    if mode == "int4" and weight.shape[1] % group_size == 0:
        return Int4Linear.from_float(weight, group_size, dtype)
    if mode in ("int4", "int8"):
        return Int8Linear.from_float(weight, dtype)
    raise ValueError(f"unknown quantization {mode!r} (expected int8 or int4)")


def quantize_model(model: nn.Module, mode: str, dtype: torch.dtype) -> nn.Module:
    """Swap every float nn.Linear of a built model for its quantized form (output layer int8 in int4 mode)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and module.weight.device.type != "meta":
            layer_mode = "int8" if name == "output" else mode
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child,
                    quantize_linear(module.weight.detach(), layer_mode, dtype))
    return model
