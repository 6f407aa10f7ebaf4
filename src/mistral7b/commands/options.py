"""The options every model-running command shares (`--model`, `--dtype`, `--device`, ...) and the `LLM` they
describe: used by cli.py's own commands and by each module of commands/ alike."""

from __future__ import annotations

import argparse
from typing import Any

from mistral7b.errors import RequestError


def window(value: str) -> int | None | str:
    if value == "keep":
        return value
    if value.lower() in ("none", "off", "0"):
        return None
    try:
        w = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'none', got {value!r}") from None
    if w < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'none', got {value!r}")
    return w


def add_model_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", help="checkpoint folder (native or Hugging Face) or .gguf file; "
                                   "default: the embedded SmolLM2-135M-Instruct")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    g.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    g.add_argument("--chunk-size", type=int, default=None, help="pre-fill chunk size in tokens")
    g.add_argument("--sliding-window", type=window, default="keep",
                   help="override the checkpoint's attention window (an integer, or 'none')")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    g.add_argument("--lora", help="LoRA adapter folder (PEFT format) to merge into the model")
    g.add_argument("--quantize", default="auto", choices=["auto", "none", "int8", "int4"],
                   help="weight quantization: auto keeps a GGUF file's own (Q4 as int4, Q8 as int8) and loads "
                        "other checkpoints in float; none = every weight in --dtype (exact reference)")
    g.add_argument("--threads", type=int, default=None, help="CPU threads (default: one per physical core)")


def add_parallel_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tensor-parallel-size", type=int, default=1,
                   help="shard the model over N processes (GPUs with --device cuda); under torchrun N = its "
                        "--nproc-per-node, else the N - 1 workers are started here")



def build_llm(a: argparse.Namespace, **extra: Any):
    from mistral7b.engine.llm import LLM

    if a.chunk_size is not None and a.chunk_size < 1:
        raise RequestError(f"--chunk-size must be a positive integer, got {a.chunk_size}")
    return LLM(a.model, dtype=a.dtype, device=a.device, chunk_size=a.chunk_size, sliding_window=a.sliding_window,
               progress=not a.quiet, lora=getattr(a, "lora", None),
               quantize=None if a.quantize == "none" else a.quantize, threads=a.threads,
               tensor_parallel_size=getattr(a, "tensor_parallel_size", 1), **extra)
