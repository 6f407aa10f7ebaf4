"""Fuse the projections that read the same input into one matmul each, for inference.

wq, wk, wv all read the attention-normed input and w1, w3 the ffn-normed one: one matmul of the stacked
weights replaces three (or two), which matters when a decode step is dominated by per-op overhead. The
stacked weight replaces the originals (no second copy). Training and LoRA keep the separate modules, so fuse
only after any adapter is merged.
"""

from __future__ import annotations

import torch
from torch import nn

from mistral7b.model.quantize import Int4Linear, Int8Linear
from mistral7b.model.transformer import Transformer


def _stack(modules: list[nn.Module]) -> nn.Module | None:
    """One module computing all outputs side by side, or None when these modules cannot be stacked."""
    kinds = {type(m) for m in modules}
    if kinds == {nn.Linear}:
        fused = nn.Linear(modules[0].in_features, sum(m.out_features for m in modules), bias=False,
                          device="meta")
        fused.weight = nn.Parameter(torch.cat([m.weight for m in modules]), requires_grad=False)
        return fused
    if kinds == {Int8Linear}:
        return Int8Linear(torch.cat([m.weight_int8 for m in modules]), torch.cat([m.scales for m in modules]))
    if kinds == {Int4Linear} and len({m.group_size for m in modules}) == 1:
        # Our layout is row by row, so rows stack (on a GPU PyTorch's packing is rebuilt from them).
        dtype = modules[0].scales_and_zeros.dtype if modules[0].scales_and_zeros is not None else torch.float32
        return Int4Linear.from_packed(torch.cat([m.qweight for m in modules]), torch.cat([m.scales for m in modules]),
                                      torch.cat([m.mins for m in modules]), modules[0].group_size, dtype)
    return None


def fuse_projections(model: Transformer) -> Transformer:
    for block in model.layers:
        attn, ffn = block.attention, block.feed_forward
        qkv = _stack([attn.wq, attn.wk, attn.wv])
        if qkv is not None:
            attn.wqkv = qkv
            del attn.wq, attn.wk, attn.wv
        w13 = _stack([ffn.w1, ffn.w3])
        if w13 is not None:
            ffn.w13 = w13
            del ffn.w1, ffn.w3
    return model
