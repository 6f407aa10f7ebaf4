"""Paged attention backends: each builds its own step metadata and reads the pool (cache/paged.py) its own way.

- torch_paged.py: gathers + matmuls / SDPA, any device (the reference);
- cpu_native.py: the CPU extension's decode attention and rotary store, where it is built;
- triton_paged.py: the Triton kernel, on a GPU (or under TRITON_INTERPRET=1).
`build` picks one for the device once, when an engine is built.
"""

from __future__ import annotations

import torch

from mistral7b import kernels
from mistral7b.attention.base import PagedAttention, StepMetadata
from mistral7b.cache.paged import PagedKVCache
from mistral7b.config import ModelArgs
from mistral7b.kernels.tuning import DecodeTuning

CHOICES = ("auto", "torch", "triton")

__all__ = ["CHOICES", "PagedAttention", "StepMetadata", "build"]


def build(args: ModelArgs, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device | str,
          attention: str = "auto", tuning: DecodeTuning | None = None) -> PagedAttention:
    """A pool of `num_blocks` blocks (the null block included) and the backend that reads it.

    `attention`: "torch", "triton" (on a CPU only under TRITON_INTERPRET=1, for tests), or "auto": the kernel
    on CUDA when Triton is installed, the CPU extension's attention on a CPU where it is built and takes the
    shapes, else PyTorch. `tuning`: how the kernel path launches (kernels/tuning.py)."""
    device = torch.device(device)
    if attention not in CHOICES:
        raise ValueError(f"attention must be one of {', '.join(CHOICES)}, got {attention!r}")
    if attention == "triton" and not kernels.available():
        raise ValueError("attention='triton' needs the triton package")
    if attention == "triton" or (attention == "auto" and device.type == "cuda" and kernels.available()):
        from mistral7b.attention.triton_paged import TritonAttention  # Triton's import is slow: this path only

        cache = PagedKVCache(args, num_blocks, block_size, dtype, device, scratch=True)
        return TritonAttention(cache, args, tuning)
    cache = PagedKVCache(args, num_blocks, block_size, dtype, device)
    if attention == "auto" and device.type == "cpu":
        from mistral7b.attention.cpu_native import NativeCpuAttention, extension_for

        ops = extension_for(args, block_size, dtype)
        if ops is not None:
            return NativeCpuAttention(cache, args, ops)
    from mistral7b.attention.torch_paged import TorchAttention

    return TorchAttention(cache, args)
