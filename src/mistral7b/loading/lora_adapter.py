"""A LoRA adapter in Hugging Face PEFT's format, read and merged into a model's weights at load (`--lora`,
`mistral7b merge`); finetune/lora.py trains and writes them with the same names.

On disk: `adapter_config.json` + `adapter_model.safetensors` with keys
`base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight` and so on. Hugging Face stores q/k rows in the
half-split rotary order, so B of wq/wk (whose rows are output rows) is permuted back on read; A is unchanged.
"""

from __future__ import annotations

import json
import os
import re

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from mistral7b.errors import CheckpointError
from mistral7b.loading import layout

TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
PARENT = {"wq": "attention", "wk": "attention", "wv": "attention", "wo": "attention",
          "w1": "feed_forward", "w2": "feed_forward", "w3": "feed_forward"}
HF_NAMES = {"wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "o_proj", "w1": "gate_proj", "w2": "down_proj",
            "w3": "up_proj"}
_PEFT_PREFIX = "base_model.model."
_KEY_RE = re.compile(r"^layers\.(\d+)\.(attention|feed_forward)\.(w[qkvo123])$")


def peft_key(native: str, part: str) -> str:
    """PEFT's tensor name for `part` (lora_A or lora_B) of the native module `native` (layers.N.attention.wq)."""
    i, _, t = _KEY_RE.match(native).groups()  # type: ignore[union-attr]
    hf_parent = "self_attn" if PARENT[t] == "attention" else "mlp"
    return f"{_PEFT_PREFIX}model.layers.{i}.{hf_parent}.{HF_NAMES[t]}.{part}.weight"


def rotary_heads(native: str, model_args) -> int | None:
    """The heads whose rows Hugging Face stores in rotary order, for a module's weight (None: not permuted)."""
    return layout.rotary_heads(native + ".weight", model_args)


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
    hf_to_native = {v: k for k, v in HF_NAMES.items()}
    key_re = re.compile(r"^(?:base_model\.model\.)?model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])"
                        r"(?:\.default)?\.weight$")
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = key_re.match(key)
        if not m or m.group(2) not in hf_to_native or int(m.group(1)) >= model_args.n_layers:
            raise CheckpointError(f"{st_path}: unexpected tensor {key}")
        t_name = hf_to_native[m.group(2)]
        parts.setdefault(f"layers.{m.group(1)}.{PARENT[t_name]}.{t_name}", {})[m.group(3)] = t.float()
    shapes = layout.expected_shapes(model_args)
    deltas = {}
    for name, ab in parts.items():
        if set(ab) != {"A", "B"}:
            raise CheckpointError(f"{st_path}: {name} has lora_{next(iter(ab))} but not its pair")
        delta = ab["B"] @ ab["A"] * scaling if ab["B"].shape[1] == ab["A"].shape[0] else None
        if delta is None or tuple(delta.shape) != shapes[name + ".weight"]:
            raise CheckpointError(f"{st_path}: LoRA of {name} does not fit the model's shape "
                                  f"{list(shapes[name + '.weight'])}")
        heads = rotary_heads(name, model_args)
        deltas[name] = layout.permute_from_hf(delta, heads) if heads else delta
    return deltas


@torch.no_grad()
def merge_adapter(model: nn.Module, folder: str) -> None:
    """Add a PEFT LoRA adapter folder into the model's weights, in place."""
    for name, delta in read_adapter(folder, model.args).items():
        w = model.get_submodule(name).weight
        w.copy_((w.float() + delta.to(w.device)).to(w.dtype))

