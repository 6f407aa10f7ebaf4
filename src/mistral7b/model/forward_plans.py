"""The model's fast paths, chosen once when a model is loaded or an engine is built on it: which operation set
(model/forward_ops.py, model/one_token.py, model/cpu_decode.py) runs a step, by device, backend and step shape.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from mistral7b.model.cpu_decode import DecodeStackOps
from mistral7b.model.forward_ops import TORCH_OPS, CpuExtensionOps, TorchOps, TritonOps


@dataclass
class ForwardPlans:
    """The plans of one model on one device with one attention backend (its `name`), chosen once."""

    device: torch.device
    backend: str | None  # the paged backend these plans serve ("torch", "cpu_native", "triton"), None: none
    plain: TorchOps  # no cache, or a cache other than the backend (the rolling buffer of scoring)
    paged: TorchOps  # the backend's steps
    one_token: Any = None  # model/one_token.OneTokenOps: a lone token on the Triton backend
    stack: Any = None  # model/cpu_decode.DecodeStackOps: a decode-only step on the native CPU backend

    def __deepcopy__(self, memo: dict) -> None:
        """A copied model has none: these plans hold the original's modules (its decode stack's tensors)."""
        return None

    def pick(self, h: torch.Tensor, cache: Any, meta: Any) -> TorchOps:
        if h.device != self.device or torch.is_grad_enabled():
            return TORCH_OPS
        if cache is None or getattr(cache, "name", None) != self.backend:
            return self.plain
        if self.stack is not None and cache.decode_only(meta) is not None:
            return self.stack
        if self.one_token is not None and h.shape[0] * h.shape[1] == 1:
            return self.one_token
        return self.paged


def fused(model: Any) -> bool:
    return all(layer.attention.wqkv is not None and layer.feed_forward.w13 is not None for layer in model.layers)


def choose(model: Any, backend: str | None = None, tuning: Any = None) -> ForwardPlans:
    """The plans for `model` as it is now (its modules, dtype and device) and the paged attention backend it
    will run with (None: no engine yet). A model changed afterwards (modules swapped) needs choosing again."""
    device = model.norm.weight.device
    plain: TorchOps = TORCH_OPS
    if device.type == "cpu" and model.dtype in (torch.float32, torch.bfloat16):
        from mistral7b import cpu

        ext = cpu.load(notice=False)
        if ext is not None:
            plain = CpuExtensionOps(ext)
    plans = ForwardPlans(device, backend, plain, plain)
    if backend == "triton" and fused(model):
        from mistral7b.model.one_token import OneTokenOps  # Triton: imported on this path only

        plans.paged = TritonOps()
        plans.one_token = OneTokenOps.for_model(model, tuning)
    elif backend == "cpu_native" and isinstance(plain, CpuExtensionOps):
        plans.stack = DecodeStackOps.for_model(model, plain.ext)
    return plans
