"""Weight-only quantized linear layers: int8 per output channel, int4 in groups, in layouts this project owns.

Decoding one token reads every weight once, so on a CPU (and a GPU at batch 1) its speed is set by weight
bytes: int8 halves bf16 and int4 quarters it. Activations stay in float; only weights are quantized.

On a CPU the extension (mistral7b/cpu, built for the capability PyTorch dispatches to) multiplies a few rows of
activations (a decode step) by the packed weights directly, and many rows (a pre-fill chunk) dequantize the
weight and run a dense matmul, the float reference's own arithmetic; the row counts where the two meet were
measured on a 2-core machine (bench/README.md). The int4 layout is ours, not PyTorch's packed one: PyTorch packs
int4 weights differently for each CPU capability it dispatches to (reading its AVX-512 layout back on an AVX2
machine gave garbage), and its AVX2 int4 kernel with float32 activations is ~28x slower than ours. Without the
extension (no compiler, another architecture) every call dequantizes in PyTorch ops: correct, slow for
decoding, so `quantize="auto"` loads such files in float there (model/build.py). On a GPU, PyTorch's int4 kernel
runs on its own packing, kept beside ours.

- `Int8Linear`: symmetric int8 per block of 32 along the input dimension (GGUF's Q8_0): w = q * scale.
- `Int4Linear`: q in 0..15 in groups along the input dimension: w = q * scale + min, in float32, which is exactly
  how GGUF's Q4_1 (min = m) and Q4_0 (min = -8 d) blocks of 32 decode: those files load into it without any
  re-quantization error.
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

from mistral7b import cpu

INT4_GROUP_SIZES = (32, 64, 128, 256)
INT8_DENSE_MIN_ROWS = 48  # from this many input rows on, dequantize and use a dense matmul
INT4_DENSE_MIN_ROWS = 48
GPU_INT4_DENSE_MIN_ROWS = 192  # PyTorch's CUDA int4 kernel against dequantizing


def cpu_ops() -> ModuleType | None:
    """The CPU extension for this process's CPU capability, or None (then PyTorch ops)."""
    return cpu.load(notice=False)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """q [N, K] (values 0..15, K a multiple of 32) -> uint8 [N, K / 2] in the extension's layout: per block of 32,
    8 little-endian 16-bit words, word j holding weights j, j + 8, j + 16, j + 24 from its lowest nibble up."""
    N, K = q.shape
    b = q.reshape(N, K // 32, 4, 8).to(torch.int32)
    words = b[:, :, 0] | b[:, :, 1] << 4 | b[:, :, 2] << 8 | b[:, :, 3] << 12  # [N, blocks, 8]
    return torch.stack([words & 255, words >> 8], dim=-1).to(torch.uint8).reshape(N, K // 2)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of pack_int4: q [N, K] uint8."""
    N = packed.shape[0]
    pairs = packed.reshape(N, -1, 8, 2).to(torch.int32)
    words = pairs[..., 0] | pairs[..., 1] << 8  # [N, blocks, 8]
    nibbles = torch.stack([(words >> (4 * i)) & 15 for i in range(4)], dim=2)  # [N, blocks, 4, 8]
    return nibbles.reshape(N, -1).to(torch.uint8)


class Int8Linear(nn.Module):
    def __init__(self, weight_int8: torch.Tensor, scales: torch.Tensor):
        """weight_int8 [N, K] int8; scales [N, K // block] (stored as float16, GGUF Q8_0's own precision):
        w = q * scale of its block. Blocks of 32 (Q8_0's) run in the CPU extension; a single block a row
        (in_features not a multiple of 32) is per output channel."""
        super().__init__()
        N, K = weight_int8.shape
        if scales.dim() == 1:
            scales = scales[:, None]
        if scales.shape[0] != N or K % scales.shape[1]:
            raise ValueError(f"int8 scales must be [{N}, blocks] with blocks dividing {K}")
        self.in_features, self.out_features, self.block = K, N, K // scales.shape[1]
        self.register_buffer("weight_int8", weight_int8.contiguous())
        self.register_buffer("scales", scales.to(torch.float16).contiguous())

    @classmethod
    def from_float(cls, weight: torch.Tensor, dtype: torch.dtype | None = None) -> Int8Linear:
        return cls.from_rows(weight.shape[0], lambda lo, hi: weight[lo:hi])

    @classmethod
    def from_rows(cls, n_rows: int, rows: Callable[[int, int], torch.Tensor], dtype: torch.dtype | None = None,
                  chunk: int = 4096) -> Int8Linear:
        """Symmetric int8 per block of 32 (Q8_0's scheme; the whole row where in_features is not a multiple of 32):
        scale = max |w| / 127, rounded to float16 before q is chosen for it. The weight is given by row ranges
        and quantized a chunk at a time, so no full-size float temporary exists."""
        qs, all_scales = [], []
        for lo in range(0, n_rows, chunk):
            w = rows(lo, min(lo + chunk, n_rows)).float()
            n, K = w.shape
            block = 32 if K % 32 == 0 else K
            w = w.reshape(n, K // block, block)
            scales = (w.abs().amax(dim=-1) / 127.0).half().float()
            q = torch.round(w / scales.clamp(min=1e-30)[..., None]).clamp(-127, 127).to(torch.int8)
            qs.append(q.reshape(n, K))
            all_scales.append(scales)
        return cls(torch.cat(qs), torch.cat(all_scales))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        N, K = self.weight_int8.shape
        w = self.weight_int8.reshape(N, -1, self.block).float() * self.scales.float()[..., None]
        return w.reshape(N, K).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        buffers = self._buffers  # read once: nn.Module's __getattr__ costs ~0.5 us a buffer
        weight, scales = buffers["weight_int8"], buffers["scales"]
        if flat.shape[0] < INT8_DENSE_MIN_ROWS:
            ops = cpu_ops() if x.is_cpu else None
            if ops is not None and self.block == 32 and x.dtype in (torch.float32, torch.bfloat16):
                return ops.int8_linear(flat.contiguous(), weight, scales).view(*x.shape[:-1], self.out_features)
            if self.block == self.in_features:  # one scale a row: PyTorch's kernel (plain row order)
                out = torch._weight_int8pack_mm(flat, weight, scales[:, 0].to(x.dtype))
                return out.view(*x.shape[:-1], self.out_features)
        return F.linear(x, self.dequantize(x.dtype))


class Int4Linear(nn.Module):
    def __init__(self, q: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, group_size: int,
                 dtype: torch.dtype):
        """q [N, K] integer values in 0..15; scales/mins [N, K // group_size] (stored as float16: GGUF's own
        precision); w = q * scale + min. `dtype`: the activations' dtype (PyTorch's GPU kernel takes its scales
        in it)."""
        super().__init__()
        self._set(pack_int4(q), scales, mins, group_size, dtype)

    @classmethod
    def from_packed(cls, qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, group_size: int,
                    dtype: torch.dtype) -> Int4Linear:
        """From weights already in our layout (pack_int4's): e.g. the rows of several layers stacked."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._set(qweight, scales, mins, group_size, dtype)
        return layer

    def _set(self, qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, group_size: int,
             dtype: torch.dtype) -> None:
        N, K = qweight.shape[0], 2 * qweight.shape[1]
        if group_size not in INT4_GROUP_SIZES or K % group_size:
            raise ValueError(f"int4 needs in_features ({K}) to be a multiple of group size {group_size}")
        if tuple(scales.shape) != (N, K // group_size) or tuple(mins.shape) != (N, K // group_size):
            raise ValueError(f"int4 scales and mins must be [{N}, {K // group_size}]")
        self.in_features, self.out_features, self.group_size = K, N, group_size
        self.register_buffer("qweight", qweight.contiguous())
        self.register_buffer("scales", scales.to(torch.float16).contiguous())
        self.register_buffer("mins", mins.to(torch.float16).contiguous())
        self.register_buffer("weight_int4", None)
        self.register_buffer("scales_and_zeros", None)
        if qweight.device.type == "cuda":  # PyTorch's int4 kernel: its own packing, w = (q - 8) * scale + zero
            q = unpack_int4(qweight)
            pairs = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)
            self.weight_int4 = torch.ops.aten._convert_weight_to_int4pack(pairs.contiguous(), 8)
            s, m = self.scales.float(), self.mins.float()
            self.scales_and_zeros = torch.stack([s, m + 8 * s], dim=-1).transpose(0, 1).contiguous().to(dtype)

    @classmethod
    def from_float(cls, weight: torch.Tensor, group_size: int, dtype: torch.dtype) -> Int4Linear:
        """Asymmetric 4-bit: per group, min = the smallest weight and scale = range / 15, both rounded to float16
        first so that q is chosen for the scale the kernel will use."""
        N, K = weight.shape
        w = weight.float().reshape(N, K // group_size, group_size)
        lo, hi = w.amin(dim=-1), w.amax(dim=-1)
        scales = ((hi - lo) / 15.0).clamp(min=1e-6).half().float()
        mins = lo.half().float()
        q = torch.round((w - mins[..., None]) / scales[..., None]).clamp(0, 15).to(torch.uint8).reshape(N, K)
        return cls(q, scales, mins, group_size, dtype)

    def values(self) -> torch.Tensor:
        """The 4-bit values q [N, K] (0..15) in natural order."""
        return unpack_int4(self.qweight)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weights: q * scale + min in float32 (exact: q * scale has at most 15 significant bits),
        then rounded to `dtype`."""
        if self.qweight.is_cpu and dtype in (torch.float32, torch.bfloat16):
            ops = cpu_ops()
            if ops is not None:
                return ops.int4_dequantize(self.qweight, self.scales, self.mins, dtype)
        N, K, G = self.out_features, self.in_features, self.group_size
        q = self.values().reshape(N, K // G, G).float()
        w = q * self.scales.float()[..., None] + self.mins.float()[..., None]
        return w.reshape(N, K).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        rows = flat.shape[0]
        buffers = self._buffers  # read once: nn.Module's __getattr__ costs ~0.5 us a buffer (120 calls a token)
        if x.is_cpu:
            if rows < INT4_DENSE_MIN_ROWS and x.dtype in (torch.float32, torch.bfloat16):
                ops = cpu_ops()
                if ops is not None:
                    out = ops.int4_linear(flat.contiguous(), buffers["qweight"], buffers["scales"], buffers["mins"])
                    return out.view(*x.shape[:-1], self.out_features)
        elif rows < GPU_INT4_DENSE_MIN_ROWS and buffers["weight_int4"] is not None:
            sz = buffers["scales_and_zeros"]
            if sz.dtype != x.dtype:
                sz = sz.to(x.dtype)
            out = torch.ops.aten._weight_int4pack_mm(flat, buffers["weight_int4"], self.group_size, sz)
            return out.view(*x.shape[:-1], self.out_features)
        return F.linear(x, self.dequantize(x.dtype))


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
