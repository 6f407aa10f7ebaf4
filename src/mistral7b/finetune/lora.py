"""LoRA: low-rank adapters swapped onto the model's nn.Linear layers by name, saved in Hugging Face PEFT's format.

`LoRALinear` is an nn.Linear (same `weight`, so checkpoint names stay native) plus `lora_A` [r, in] and
`lora_B` [out, r]: y = x W^T + (alpha / r) * x A^T B^T, with A drawn as PEFT does and B = 0 (training starts
from the base model exactly).

On disk (PEFT), as loading/lora_adapter.py reads them (and merges them at load): B of wq/wk is permuted to
Hugging Face's rotary row order on save; A is unchanged.
"""

from __future__ import annotations

import math
import os

import torch
from torch import nn

from mistral7b.finetune.checkpointing import atomic_json, atomic_safetensors
from mistral7b.loading import layout
from mistral7b.loading.lora_adapter import HF_NAMES, PARENT, TARGETS, peft_key, rotary_heads
from mistral7b.model.transformer import Transformer


class LoRALinear(nn.Linear):
    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.register_parameter("bias", None)
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        dev = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=dev, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=dev, dtype=torch.float32))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # PEFT's default init

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = nn.functional.linear(x, self.weight)
        a, b = self.lora_A.to(x.dtype), self.lora_B.to(x.dtype)
        return base + (x @ a.t() @ b.t()) * self.scaling

    def delta(self) -> torch.Tensor:
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling


def parse_targets(spec: str | list[str]) -> list[str]:
    names = [t.strip() for t in (spec.split(",") if isinstance(spec, str) else spec) if t.strip()]
    bad = [t for t in names if t not in TARGETS]
    if bad or not names:
        raise ValueError(f"LoRA targets must be a comma-separated subset of {','.join(TARGETS)}, got {spec!r}")
    return names


def apply_lora(model: Transformer, rank: int, alpha: float, targets: list[str]) -> list[str]:
    """Swap LoRALinear onto every targeted Linear; freeze everything but the adapters. Returns module names."""
    if rank < 1:
        raise ValueError(f"--lora-rank must be a positive integer, got {rank}")
    for p in model.parameters():
        p.requires_grad_(False)
    names = []
    for i, layer in enumerate(model.layers):
        for t in targets:
            parent = getattr(layer, PARENT[t])
            setattr(parent, t, LoRALinear(getattr(parent, t), rank, alpha))
            names.append(f"layers.{i}.{PARENT[t]}.{t}")
    return names


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def save_adapter(model: Transformer, folder: str, base_model: str = "") -> None:
    """adapter_model.safetensors + adapter_config.json in PEFT's format (HF names, HF rotary row order)."""
    mods = lora_modules(model)
    if not mods:
        raise ValueError("the model has no LoRA adapters to save")
    tensors = {}
    for name, m in mods.items():
        b = m.lora_B.detach().float().cpu()
        heads = rotary_heads(name, model.args)
        tensors[peft_key(name, "lora_A")] = m.lora_A.detach().float().cpu().contiguous()
        tensors[peft_key(name, "lora_B")] = (layout.permute_to_hf(b, heads) if heads else b).contiguous()
    first = next(iter(mods.values()))
    targets = sorted({HF_NAMES[n.rsplit(".", 1)[1]] for n in mods})
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": first.rank, "lora_alpha": first.alpha, "lora_dropout": 0.0, "target_modules": targets,
        "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "use_rslora": False,
        "init_lora_weights": True, "modules_to_save": None,
    }
    os.makedirs(folder, exist_ok=True)
    atomic_safetensors(os.path.join(folder, "adapter_model.safetensors"), tensors)
    atomic_json(os.path.join(folder, "adapter_config.json"), config)
