"""LoRA training throughput on a Mistral-7B-shaped model: our trainer against Hugging Face PEFT + transformers.

One process, one GPU, random weights (no checkpoint, no download). For each shape (rows x tokens) and each
engine, a fresh model is built, trained for `--warmup` steps, then `--steps` steps are timed between
torch.cuda.synchronize() calls; the first model is freed before the next is built.

- ours: the real `finetune.trainer.Trainer` (its __init__ and `train_step`, unchanged) with only the inputs
  swapped: `open_checkpoint`, `build_model`, the tokenizer and `read_jsonl` are replaced in the trainer's module
  by a random bf16 model made on the meta device, `to_empty` on the GPU and filled in place, and random token
  rows. Everything else is the `mistral7b finetune` path: `lora.apply_lora` (rank 16, alpha 32, all 7
  projections), bf16 autocast, `_checkpoint_blocks`, `_token_loss`, AdamW over the adapters, clipping.
- hf: transformers `MistralForCausalLM` (attn_implementation "sdpa", gradient checkpointing with
  use_reentrant=False) + PEFT `LoraConfig(r=16, lora_alpha=32)` on q,k,v,o,gate,up,down, bf16 autocast (what
  HF's Trainer does with bf16=True), AdamW (fused, HF Trainer's default on torch >= 2.8) over the trainable
  parameters, clipping at 1.0.
Both get the same weights (each tensor drawn from a generator seeded by its native name; HF's q/k rows in its
rotary order) and the same token rows, so the first-step losses must agree. The output layer is drawn with
std 0.002 (0.02 elsewhere) so that the first loss sits at ~ln(32000) = 10.37.

Usage (GPU): PYTHONPATH=src python bench/finetune_gpu.py [--shapes 1x2048,4x2048,1x4096] [--out DIR]
CPU smoke test: PYTHONPATH=src python bench/finetune_gpu.py --tiny
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import subprocess
import sys
import time
import types
from unittest import mock

import torch

HF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK, ALPHA, LR = 16, 32.0, 2e-4


def model_args(tiny: bool):
    from mistral7b.config import PRESETS, ModelArgs

    if tiny:
        return ModelArgs(dim=64, n_layers=2, head_dim=16, hidden_dim=160, n_heads=4, n_kv_heads=2, norm_eps=1e-5,
                         vocab_size=32000, rope_theta=1e4, sliding_window=4096, max_seq_len=8192)
    return PRESETS["mistral-7b-v0.1"]


# ---------------------------------------------------------------------------------------------- ours


def random_model(args, dtype: torch.dtype, device: torch.device):
    """Our Transformer with random weights: meta device, to_empty on `device` in `dtype`, filled in place."""
    from bench.random_weights import native_tensor
    from mistral7b.model.transformer import Transformer

    with torch.device("meta"):
        model = Transformer(args)
    model = model.to(dtype=dtype).to_empty(device=device)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(native_tensor(name, tuple(p.shape), device))
            p.requires_grad_(False)
    return model.eval()


def make_examples(n: int, seq_len: int, vocab: int, seed: int):
    """n random token sequences of seq_len + 1 ids, every target carrying loss (one example = one row)."""
    from mistral7b.finetune.data import Example

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (n, seq_len + 1), generator=g).tolist()
    return [Example(row, [True] * len(row), i + 1) for i, row in enumerate(ids)]


def build_ours(args, rows: int, seq_len: int, n_steps: int, device: torch.device, examples):
    """The project's Trainer, built by its own __init__ with the checkpoint/data inputs replaced."""
    import mistral7b.engine.llm as engine_llm
    from mistral7b.finetune import trainer as tr

    cfg = tr.TrainConfig(model="<random mistral-7b-v0.1>", data="<random tokens>", out="/tmp/finetune_gpu_bench",
                         lora_rank=RANK, lora_alpha=ALPHA, lr=LR, batch_tokens=rows * seq_len, seq_len=seq_len,
                         max_steps=n_steps, warmup=0, device=str(device), progress=False)
    base = types.SimpleNamespace(args=args, path=cfg.model)
    with mock.patch.object(tr, "open_checkpoint", lambda path, sliding_window="keep": base), \
            mock.patch.object(engine_llm, "checkpoint_tokenizer", lambda b: object()), \
            mock.patch.object(tr, "read_jsonl", lambda path, tok, seq_len, skip_bad=False: (examples, 0)), \
            mock.patch.object(tr, "build_model", lambda b, dtype, dev, progress=True: random_model(b.args, dtype, dev)):
        trainer = tr.Trainer(cfg)
    return trainer


def ours_step_fn(trainer):
    def step(i: int) -> float:
        loss, _ = trainer.train_step(i)  # returns a Python float: one sync per step, as in Trainer.run
        return loss

    return step


def ours_batches(trainer, n_steps: int) -> list[torch.Tensor]:
    """The token rows the trainer's stream gives step by step (so HF trains on exactly the same rows)."""
    from mistral7b.finetune.data import collate

    return [collate(trainer.stream.rows(i)[0])["tokens"] for i in range(n_steps)]


# ---------------------------------------------------------------------------------------------- hf


def build_hf(args, device: torch.device, dtype: torch.dtype):
    from peft import LoraConfig, get_peft_model

    from bench.random_weights import random_hf_mistral

    model = random_hf_mistral(args, device, dtype)
    model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    peft_model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, bias="none",
                                                  target_modules=HF_TARGETS, task_type="CAUSAL_LM"))
    peft_model.train()
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=LR, betas=(0.9, 0.95), weight_decay=0.0,
                            fused=device.type == "cuda")
    return peft_model, trainable, opt


def hf_step_fn(model, trainable, opt, batches, device):
    autocast = device.type == "cuda"
    on_device = [b.to(device) for b in batches]

    def step(i: int) -> float:
        x = on_device[i]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = model(input_ids=x, labels=x, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


# ---------------------------------------------------------------------------------------------- timing


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(step, warmup: int, steps: int, tokens_per_step: int, device: torch.device) -> dict:
    losses = []
    for i in range(warmup):
        losses.append(step(i))
    sync(device)
    t0 = time.perf_counter()
    for i in range(warmup, warmup + steps):
        losses.append(step(i))
    sync(device)
    dt = time.perf_counter() - t0
    return {"first_loss": losses[0], "last_loss": losses[-1], "ms_per_step": 1e3 * dt / steps,
            "tokens_per_s": tokens_per_step * steps / dt}


def profile_step(step, i: int, device: torch.device, path: str) -> None:
    """One more step under torch.profiler; the kernels by GPU time go to `path`."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        step(i)
        sync(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    with open(path, "w", encoding="utf-8") as f:
        f.write(f"{len(prof.events())} events\n")
        f.write(prof.key_averages().table(sort_by=key, row_limit=40, max_name_column_width=90))


def free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_engine(name: str, args, rows: int, seq_len: int, a, device: torch.device, examples, out: str,
               profile: bool) -> tuple[dict, list[torch.Tensor]]:
    n_steps = a.warmup + a.steps + 1
    free()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t_build = time.perf_counter()
    if name == "ours":
        torch.manual_seed(0)
        trainer = build_ours(args, rows, seq_len, n_steps, device, examples)
        batches = ours_batches(trainer, n_steps)
        step = ours_step_fn(trainer)
        n_trainable = sum(p.numel() for p in trainer.params.values())
    else:
        torch.manual_seed(0)
        model, trainable, opt = build_hf(args, device, torch.bfloat16 if device.type == "cuda" else torch.float32)
        batches = a.batches
        step = hf_step_fn(model, trainable, opt, batches, device)
        n_trainable = sum(p.numel() for p in trainable)
    sync(device)
    build_s = time.perf_counter() - t_build
    result = measure(step, a.warmup, a.steps, rows * seq_len, device)
    result.update(engine=name, rows=rows, seq_len=seq_len, build_s=build_s, trainable_params=n_trainable,
                  peak_mem_gib=torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None)
    if profile:
        profile_step(step, a.warmup + a.steps, device, os.path.join(out, f"profile_{name}_{rows}x{seq_len}.txt"))
    print(f"  {name:5s} {rows}x{seq_len}: {result['tokens_per_s']:,.0f} tok/s, {result['ms_per_step']:.1f} ms/step, "
          f"first loss {result['first_loss']:.4f}, peak {result['peak_mem_gib'] or 0:.1f} GiB, build "
          f"{build_s:.1f} s, trainable {n_trainable:,}", flush=True)
    return result, batches  # the model goes with this frame; the next run_engine frees it before building


def device_info(device: torch.device) -> dict:
    info = {"torch": torch.__version__, "python": sys.version.split()[0]}
    for mod in ("transformers", "peft"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception as e:  # noqa: BLE001
            info[mod] = f"unavailable ({e})"
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(gpu=p.name, gpu_mem_gib=round(p.total_memory / 2**30, 1), sms=p.multi_processor_count,
                    cuda=torch.version.cuda)
        try:
            info["nvidia_smi"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return info


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="a 2-layer dim-64 model (CPU smoke test of the script)")
    p.add_argument("--shapes", default=None, help="rows x tokens per step, e.g. 1x2048,4x2048,1x4096")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--engines", default="ours,hf")
    p.add_argument("--no-profile", action="store_true", help="skip the one profiled step of the first shape")
    p.add_argument("--out", default=os.environ.get("OUT", "/tmp/finetune_gpu"))
    a = p.parse_args()
    spec = a.shapes or ("1x64,2x32" if a.tiny else "1x2048")
    shapes = [tuple(int(v) for v in s.split("x")) for s in spec.split(",")]
    os.makedirs(a.out, exist_ok=True)
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:0] = [os.path.join(here, "..", "src"), os.path.join(here, "..")]
    device = torch.device(a.device)
    args = model_args(a.tiny)
    info = device_info(device)
    print("device:", json.dumps(info), flush=True)
    engines = a.engines.split(",")
    results, errors = [], []
    for k, (rows, seq_len) in enumerate(shapes):
        examples = make_examples(max(8, rows * (a.warmup + a.steps + 1)), seq_len, args.vocab_size, seed=k)
        a.batches = None
        for name in engines:
            if name == "hf" and a.batches is None:  # HF alone: the trainer's rows are what ours would see
                a.batches = [torch.tensor([examples[(i * rows + r) % len(examples)].ids[:-1] for r in range(rows)])
                             for i in range(a.warmup + a.steps + 1)]
            try:
                res, batches = run_engine(name, args, rows, seq_len, a, device, examples, a.out,
                                          profile=k == 0 and not a.no_profile)
            except Exception as e:  # noqa: BLE001 - one failing engine must not lose the other rows
                import traceback

                traceback.print_exc()
                errors.append(f"{name} {rows}x{seq_len}: {type(e).__name__}: {e}")
                free()
                continue
            if name == "ours":
                a.batches = batches
            results.append(res)
    ln_v = math.log(args.vocab_size)
    lines = ["| engine | rows x tokens | tokens/s | ms/step | peak GPU memory GiB | "
             f"first-step loss (ln V = {ln_v:.2f}) |", "|---|---|---|---|---|---|"]
    hf_label = f"PEFT {info.get('peft')} + transformers {info.get('transformers')}"
    for r in results:
        label = "mistral7b (ours)" if r["engine"] == "ours" else hf_label
        mem = f"{r['peak_mem_gib']:.1f}" if r["peak_mem_gib"] is not None else "-"
        lines.append(f"| {label} | {r['rows']} x {r['seq_len']} | {r['tokens_per_s']:,.0f} | {r['ms_per_step']:.1f} "
                     f"| {mem} | {r['first_loss']:.4f} |")
    ratios = []
    for rows, seq_len in shapes:
        by = {r["engine"]: r for r in results if (r["rows"], r["seq_len"]) == (rows, seq_len)}
        if "ours" in by and "hf" in by:
            speed = by["ours"]["tokens_per_s"] / by["hf"]["tokens_per_s"]
            diff = abs(by["ours"]["first_loss"] - by["hf"]["first_loss"])
            ratios.append(f"{rows}x{seq_len}: ours/HF tokens/s = {speed:.2f}, first-loss difference {diff:.4f}")
    with open(os.path.join(a.out, "finetune_gpu.json"), "w", encoding="utf-8") as f:
        json.dump({"device": info, "model": args.to_dict(), "lora": {"rank": RANK, "alpha": ALPHA, "lr": LR},
                   "warmup": a.warmup, "steps": a.steps, "results": results, "ratios": ratios,
                   "errors": errors}, f, indent=2)
    print("\n" + "\n".join(lines) + "\n\n" + "\n".join(ratios + errors), flush=True)


if __name__ == "__main__":
    main()
