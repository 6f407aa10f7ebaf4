"""`mistral7b finetune`: LoRA (default) or full instruction tuning on a JSONL file; see mistral7b.finetune.

Run it under torchrun for data parallelism: `torchrun --nproc-per-node 2 -m mistral7b finetune ...`.
"""

from __future__ import annotations

import argparse
import json


def _targets(value: str) -> list[str]:
    from mistral7b.finetune.lora import parse_targets

    try:
        return parse_targets(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def register(sub: argparse._SubParsersAction) -> None:
    from mistral7b.commands.options import window

    p = sub.add_parser("finetune", help="fine-tune a model on JSONL chats or text (LoRA or full)")
    p.add_argument("--model", help="base checkpoint folder or .gguf file; default: the embedded SmolLM2")
    p.add_argument("--data", required=True, help='JSONL: {"messages": [...]} or {"text": ...} per line')
    p.add_argument("--eval", dest="eval_data", help="held-out JSONL for the eval loss")
    p.add_argument("--out", required=True, help="output folder (adapter or model, checkpoints/, loss_curve.png)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--full", action="store_true", help="train every weight instead of LoRA adapters")
    mode.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--lora-alpha", type=float, default=16.0)
    p.add_argument("--lora-targets", type=_targets, default="wq,wk,wv,wo,w1,w2,w3")
    p.add_argument("--epochs", type=int, default=None,
                   help="passes over the data (default: 1, or enough for 20 optimizer steps on a small file, at "
                   "most 20)")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--batch-tokens", type=int, default=4096, help="tokens per micro-batch (rows * seq-len)")
    p.add_argument("--seq-len", type=int, default=1024, help="packed row length")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--warmup", type=int, default=10, help="warmup steps before the cosine decay")
    p.add_argument("--clip", type=float, default=1.0, help="gradient norm clip")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--skip-bad", action="store_true", help="skip bad records (their count is printed)")
    p.add_argument("--activation-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="recompute each block in backward to save memory (default: when a micro-batch's "
                        "activations would take more than a quarter of the free memory)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (torchrun: each rank takes its local GPU)")
    p.add_argument("--sliding-window", type=window, default="keep")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(a: argparse.Namespace) -> int:
    from mistral7b.default_model import default_model_path
    from mistral7b.errors import RequestError
    from mistral7b.finetune.trainer import Trainer, config_from

    if isinstance(a.lora_targets, str):
        a.lora_targets = _targets(a.lora_targets)
    try:
        cfg = config_from(**{**vars(a), "model": a.model or default_model_path(), "progress": not a.quiet})
        summary = Trainer(cfg).run()
    except ValueError as e:
        raise RequestError(str(e)) from None
    if summary["rank"] == 0:
        print(json.dumps(summary))
    return 0
