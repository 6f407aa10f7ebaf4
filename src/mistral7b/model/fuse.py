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
        if modules[0].weight_int4.device.type != "cpu" or any(m.out_features % 64 for m in modules):
            return None  # packed layouts are tiled across rows (64 on CPU): only whole tiles stack by rows
        fused = Int4Linear.__new__(Int4Linear)
        nn.Module.__init__(fused)
        fused.in_features, fused.group_size = modules[0].in_features, modules[0].group_size
        fused.out_features = sum(m.out_features for m in modules)
        fused.register_buffer("weight_int4", torch.cat([m.weight_int4 for m in modules]))
        fused.register_buffer("weight_nibbles", None)  # whole CPU tiles: read back from the packed layout
        fused.register_buffer("scales_and_zeros", torch.cat([m.scales_and_zeros for m in modules], dim=1))
        return fused
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
