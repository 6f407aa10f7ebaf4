"""Random Mistral-shaped weights shared by the GPU benchmarks: each tensor is drawn from a generator seeded by
its native name, so our model and Hugging Face's `MistralForCausalLM` get the same values without a checkpoint
to download. Norms are 1; the output layer has std 0.002 (0.02 elsewhere), so the first logits stay near
uniform and a first training loss sits at ~ln(vocab)."""

from __future__ import annotations

import zlib
from typing import Any

import torch

from mistral7b.config import ModelArgs
from mistral7b.loading import layout


def native_tensor(name: str, shape: tuple[int, ...], device: torch.device,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The value of native parameter `name`, the same on every call."""
    if len(shape) == 1:  # RMSNorm weights
        return torch.ones(shape, device=device, dtype=dtype)
    g = torch.Generator(device=device).manual_seed(zlib.crc32(name.encode()))
    std = 0.002 if name == "output.weight" else 0.02
    return (torch.randn(shape, generator=g, device=device) * std).to(dtype)


def random_hf_mistral(args: ModelArgs, device: torch.device, dtype: torch.dtype) -> Any:
    """transformers' MistralForCausalLM (sdpa) in `dtype` on `device` holding the `native_tensor` weights (q/k
    rows permuted to its half-split rotary layout)."""
    import transformers

    cfg = args.to_hf_config()
    cfg.pop("architectures"), cfg.pop("model_type")
    config = transformers.MistralConfig(**cfg, attn_implementation="sdpa")
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = transformers.MistralForCausalLM(config)
    finally:
        torch.set_default_dtype(prev)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, shape in layout.expected_shapes(args).items():
            value = native_tensor(name, shape, device, dtype)
            heads = layout.rotary_heads(name, args)
            params[layout.from_native_name(name, "hf")].copy_(layout.permute_to_hf(value, heads) if heads else value)
    return model
