"""`mistral7b merge`: fold a LoRA adapter (PEFT format) into its base model and write a full checkpoint."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("merge", help="merge a LoRA adapter into its base model")
    p.add_argument("--model", help="base checkpoint folder or .gguf file; default: the embedded SmolLM2")
    p.add_argument("--lora", required=True, help="adapter folder (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--format", choices=["native", "hf", "gguf"], default=None,
                   help="output format (default: the base model's)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=run)


def run(a: argparse.Namespace) -> int:
    import torch

    from mistral7b.default_model import default_model_path
    from mistral7b.finetune.export import save_model
    from mistral7b.loading.lora_adapter import merge_adapter
    from mistral7b.loading import open_checkpoint
    from mistral7b.model.build import build_model

    base = open_checkpoint(a.model or default_model_path())
    model = build_model(base, torch.float32, progress=not a.quiet)
    merge_adapter(model, a.lora)
    print(save_model(model, base, a.out, a.format))
    return 0
