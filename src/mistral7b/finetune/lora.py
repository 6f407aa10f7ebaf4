"""LoRA: low-rank adapters swapped onto the model's nn.Linear layers by name, saved in Hugging Face PEFT's format.

`LoRALinear` is an nn.Linear (same `weight`, so checkpoint names stay native) plus `lora_A` [r, in] and
`lora_B` [out, r]: y = x W^T + (alpha / r) * x A^T B^T, with A drawn as PEFT does and B = 0 (training starts
from the base model exactly).

On disk (PEFT): `adapter_config.json` + `adapter_model.safetensors` with keys
`base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight` and so on. Hugging Face stores q/k rows in the
half-split rotary order, so B of wq/wk (whose rows are output rows) is permuted like the weight rows on save and
back on load; A is unchanged.
"""

from __future__ import annotations

import json
import math
import os
import re

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from mistral7b.errors import CheckpointError
from mistral7b.finetune.checkpointing import atomic_json, atomic_safetensors
from mistral7b.loading import layout
from mistral7b.model.transformer import Transformer

TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
_PARENT = {"wq": "attention", "wk": "attention", "wv": "attention", "wo": "attention",
           "w1": "feed_forward", "w2": "feed_forward", "w3": "feed_forward"}
_HF = {"wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "o_proj", "w1": "gate_proj", "w2": "down_proj",
       "w3": "up_proj"}
_PEFT_PREFIX = "base_model.model."
_KEY_RE = re.compile(r"^layers\.(\d+)\.(attention|feed_forward)\.(w[qkvo123])$")


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
            parent = getattr(layer, _PARENT[t])
            setattr(parent, t, LoRALinear(getattr(parent, t), rank, alpha))
            names.append(f"layers.{i}.{_PARENT[t]}.{t}")
    return names


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def _peft_key(native: str, part: str) -> str:
    i, _, t = _KEY_RE.match(native).groups()  # type: ignore[union-attr]
    hf_parent = "self_attn" if _PARENT[t] == "attention" else "mlp"
    return f"{_PEFT_PREFIX}model.layers.{i}.{hf_parent}.{_HF[t]}.{part}.weight"


def _rotary(native: str, model_args) -> int | None:
    return layout.rotary_heads(native + ".weight", model_args)


def save_adapter(model: Transformer, folder: str, base_model: str = "") -> None:
    """adapter_model.safetensors + adapter_config.json in PEFT's format (HF names, HF rotary row order)."""
    mods = lora_modules(model)
    if not mods:
        raise ValueError("the model has no LoRA adapters to save")
    tensors = {}
    for name, m in mods.items():
        b = m.lora_B.detach().float().cpu()
        heads = _rotary(name, model.args)
        tensors[_peft_key(name, "lora_A")] = m.lora_A.detach().float().cpu().contiguous()
        tensors[_peft_key(name, "lora_B")] = (layout.permute_to_hf(b, heads) if heads else b).contiguous()
    first = next(iter(mods.values()))
    targets = sorted({_HF[n.rsplit(".", 1)[1]] for n in mods})
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": first.rank, "lora_alpha": first.alpha, "lora_dropout": 0.0, "target_modules": targets,
        "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "use_rslora": False,
        "init_lora_weights": True, "modules_to_save": None,
    }
    os.makedirs(folder, exist_ok=True)
    atomic_safetensors(os.path.join(folder, "adapter_model.safetensors"), tensors)
    atomic_json(os.path.join(folder, "adapter_config.json"), config)


def read_adapter(folder: str, model_args) -> dict[str, torch.Tensor]:
    """Native module name -> merged weight delta (alpha/r * B A, native row order) of a PEFT LoRA folder."""
    cfg_path = os.path.join(folder, "adapter_config.json")
    st_path = os.path.join(folder, "adapter_model.safetensors")
    for p in (cfg_path, st_path):
        if not os.path.isfile(p):
            raise CheckpointError(f"{folder}: not a LoRA adapter folder (missing {os.path.basename(p)})")
    try:
        with open(cfg_path, encoding="utf-8") as f:
            cfg = json.load(f)
        r, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{cfg_path}: not a valid adapter config ({e})") from None
    if cfg.get("peft_type", "LORA") != "LORA" or cfg.get("use_rslora") or cfg.get("use_dora"):
        raise CheckpointError(f"{cfg_path}: only plain LoRA adapters are supported")
    scaling = alpha / r
    try:
        tensors = load_file(st_path)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{st_path}: truncated or corrupt safetensors file ({e})") from None
    hf_to_native = {v: k for k, v in _HF.items()}
    key_re = re.compile(r"^(?:base_model\.model\.)?model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])"
                        r"(?:\.default)?\.weight$")
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = key_re.match(key)
        if not m or m.group(2) not in hf_to_native or int(m.group(1)) >= model_args.n_layers:
            raise CheckpointError(f"{st_path}: unexpected tensor {key}")
        t_name = hf_to_native[m.group(2)]
        parts.setdefault(f"layers.{m.group(1)}.{_PARENT[t_name]}.{t_name}", {})[m.group(3)] = t.float()
    shapes = layout.expected_shapes(model_args)
    deltas = {}
    for name, ab in parts.items():
        if set(ab) != {"A", "B"}:
            raise CheckpointError(f"{st_path}: {name} has lora_{next(iter(ab))} but not its pair")
        delta = ab["B"] @ ab["A"] * scaling if ab["B"].shape[1] == ab["A"].shape[0] else None
        if delta is None or tuple(delta.shape) != shapes[name + ".weight"]:
            raise CheckpointError(f"{st_path}: LoRA of {name} does not fit the model's shape "
                                  f"{list(shapes[name + '.weight'])}")
        heads = _rotary(name, model_args)
        deltas[name] = layout.permute_from_hf(delta, heads) if heads else delta
    return deltas


@torch.no_grad()
def merge_adapter(model: Transformer, folder: str) -> None:
    """Add a PEFT LoRA adapter folder into the model's weights, in place."""
    for name, delta in read_adapter(folder, model.args).items():
        w = model.get_submodule(name).weight
        w.copy_((w.float() + delta.to(w.device)).to(w.dtype))

