"""The CPU decode plan, chosen once when an engine is built on a model (model/forward_plans.py): the
extension's DecodeStack (mistral7b/cpu/blocks.cpp) runs a decode-only step's blocks in one call, with the same
ops and bits as the model's loop under CpuExtensionOps, where the model's projections are ones it knows (float,
int4 in our layout, int8 in blocks of 32) and the paged cache attends natively (attention/cpu_native.py). Built
from the modules the model has then: a model changed afterwards (modules swapped) needs choosing again.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import torch
from torch import nn

from mistral7b.model.forward_ops import CpuExtensionOps
from mistral7b.model.quantize import INT4_DENSE_MIN_ROWS, INT8_DENSE_MIN_ROWS, Int4Linear, Int8Linear


def _projection(module: nn.Module | None) -> tuple[int, list[torch.Tensor]] | None:
    """(kind, tensors) as the DecodeStack takes a projection, or None for one it does not know."""
    if isinstance(module, Int4Linear):
        return 1, [module.qweight, module.scales, module.mins]
    if isinstance(module, Int8Linear) and module.block == 32:
        return 2, [module.weight_int8, module.scales]
    if type(module) is nn.Linear and module.bias is None:
        return 0, [module.weight]
    return None


def quantized(model: Any) -> bool:
    """Whether every projection of every block runs in the extension's quantized kernels (then a decode step
    runs ATen single-threaded: cpu.decode_threads)."""
    return all(isinstance(getattr(layer.attention, "wqkv", None), (Int4Linear, Int8Linear))
               and isinstance(layer.attention.wo, (Int4Linear, Int8Linear))
               and isinstance(getattr(layer.feed_forward, "w13", None), (Int4Linear, Int8Linear))
               and isinstance(layer.feed_forward.w2, (Int4Linear, Int8Linear)) for layer in model.layers)


def build_stack(model: Any, ops: ModuleType) -> Any:
    """The extension's DecodeStack for `model`, or None where a block has a projection it does not know."""
    tensors, kinds = [], []
    for layer in model.layers:
        attention, ff = layer.attention, layer.feed_forward
        parts = [_projection(m) for m in (getattr(attention, "wqkv", None), attention.wo,
                                          getattr(ff, "w13", None), ff.w2)]
        if any(p is None for p in parts):
            return None
        tensors.append([layer.attention_norm.weight, layer.ffn_norm.weight] + [t for _, ts in parts for t in ts])
        kinds.append([kind for kind, _ in parts])
    args = model.args
    return ops.DecodeStack(tensors, kinds, args.n_heads, args.n_kv_heads, args.head_dim, args.norm_eps,
                           [INT4_DENSE_MIN_ROWS, INT8_DENSE_MIN_ROWS])


class DecodeStackOps(CpuExtensionOps):
    """A decode-only step's blocks in one call of the extension; the logits as CpuExtensionOps makes them."""

    whole_stack = True

    def __init__(self, ext: ModuleType, stack: Any):
        super().__init__(ext)
        self.decode_stack = stack

    @classmethod
    def for_model(cls, model: Any, ext: ModuleType) -> DecodeStackOps | None:
        on_cpu = next(model.parameters()).device.type == "cpu"
        stack = build_stack(model, ext) if on_cpu and model.layers else None
        return None if stack is None else cls(ext, stack)

    def blocks(self, h: torch.Tensor, freqs: torch.Tensor, meta: Any, cache: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """(residual, delta) [1, N, dim] after every block, for the native backend's decode rows."""
        rows = cache.decode_only(meta)
        pool = cache.cache
        residual, delta = self.decode_stack.forward(h[0].contiguous(), pool.k, pool.v,
                                                    torch.view_as_real(freqs).reshape(h.shape[1], -1, 2),
                                                    meta.slot_mapping, rows.block_tables, rows.first_blocks,
                                                    rows.seq_lens, cache.window or 0)
        return residual[None], delta[None]
