"""The fine-tuning loop: LoRA or full, AdamW with warmup + cosine, clipping, accumulation, exact resume.

One optimizer step = `rows_per_micro * grad_accum * world` packed rows. Its loss is the sum of token losses
divided by the number of loss tokens of the whole step (across micro-batches and ranks), so the update does
not depend on how the step is split. Float32 on CPU; bf16 autocast on GPU (LoRA keeps the frozen base in bf16).
Activation checkpointing recomputes each block in the backward pass instead of storing its activations.

Fault injection for the kill-and-resume test: MISTRAL7B_FINETUNE_SIGKILL_AT_STEP=N makes the process SIGKILL
itself after finishing step N (after any checkpoint due at N), as an outside `kill -9` would.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

from mistral7b.finetune import distributed as ddp
from mistral7b.finetune import lora
from mistral7b.finetune.checkpointing import atomic_json, latest_checkpoint, load_checkpoint, save_checkpoint
from mistral7b.finetune.data import IGNORE, collate, pack, read_jsonl
from mistral7b.finetune.schedule import RowStream, empty_row, lr_at
from mistral7b.loading import open_checkpoint
from mistral7b.model.build import build_model


@dataclass
class TrainConfig:
    model: str
    data: str
    out: str
    eval_data: str | None = None
    full: bool = False
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: list[str] = field(default_factory=lambda: list(lora.TARGETS))
    epochs: int | None = None  # None: enough epochs for SHORT_RUN optimizer steps, at most MAX_AUTO_EPOCHS
    max_steps: int | None = None
    lr: float = 2e-4
    weight_decay: float = 0.0
    batch_tokens: int = 4096
    seq_len: int = 1024
    grad_accum: int = 1
    warmup: int = 10
    clip: float = 1.0
    seed: int = 0
    eval_every: int = 50
    save_every: int = 100
    resume: bool = False
    skip_bad: bool = False
    activation_checkpointing: bool | None = None  # None: when activations would not fit (needs_checkpointing)
    device: str = "cpu"
    sliding_window: int | None | str = "keep"
    progress: bool = True

    def validate(self) -> None:
        if self.epochs is not None and self.epochs < 1:
            raise ValueError("--epochs must be a positive integer")
        for name in ("batch_tokens", "seq_len", "grad_accum", "eval_every", "save_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be a positive integer")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError("--max-steps must be a positive integer")
        if self.batch_tokens < self.seq_len:
            raise ValueError(f"--batch-tokens ({self.batch_tokens}) must be at least --seq-len ({self.seq_len})")
        if not self.lr > 0 or self.warmup < 0 or self.clip <= 0:
            raise ValueError("--lr and --clip must be positive and --warmup non-negative")


SHORT_RUN = 20  # optimizer steps below which a run is said to be too short to teach the model anything
MAX_AUTO_EPOCHS = 20  # the most passes over the data that --epochs left out makes


def available_memory(device: torch.device) -> int:
    """Free bytes for activations: the GPU's free memory, or the machine's available memory (Linux)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2


def needs_checkpointing(args, tokens: int, dtype: torch.dtype, full: bool, device: torch.device) -> bool:
    """Whether a micro-batch of `tokens` keeps too many activations for backward: more than a quarter of the
    free memory. Per token a block keeps ~12 vectors of the model width and ~4 of the hidden width (norms, q/k/v,
    attention output, residuals, gate/up/product); full training adds as much again for its larger graph.
    Recomputing each block in backward costs a forward (30% of a CPU step of the embedded model), so it is on
    only where memory asks for it: 20 short chats (~800 tokens) on the embedded model keep ~1.2 GB; a 7B model's
    4,096-token micro-batch ~26 GB."""
    bytes_per_token = args.n_layers * (12 * args.dim + 4 * args.hidden_dim) * torch.empty(0, dtype=dtype).element_size()
    return tokens * bytes_per_token * (2 if full else 1) > available_memory(device) // 4


def _checkpoint_blocks(model: torch.nn.Module) -> None:
    """Recompute each transformer block in backward (names and state dict unchanged)."""
    for block in model.layers:
        block.forward = functools.partial(checkpoint, block.__class__.forward.__get__(block), use_reentrant=False)


def _token_loss(model, batch: dict[str, torch.Tensor], device: torch.device,
                autocast: bool) -> tuple[torch.Tensor, int]:
    """(sum of cross-entropy over loss tokens, number of loss tokens) of one micro-batch. Logits are computed at
    the loss positions only (logits_index): a chat's loss is on its answers, and the output matmul and the
    [tokens, vocab] float logits of every prompt and padding position were most of a CPU step's time and memory."""
    b = {k: v.to(device) for k, v in batch.items()}
    targets = b["targets"].flatten()
    index = (targets != IGNORE).nonzero()[:, 0]
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        logits = model(b["tokens"], b["positions"], segment_ids=b["segments"], logits_index=index)
    loss = F.cross_entropy(logits.float(), targets[index], reduction="sum")
    return loss, int(index.numel())


class Trainer:
    def __init__(self, cfg: TrainConfig):
        cfg.validate()
        self.cfg = cfg
        self.info, self.device = ddp.init(cfg.device)
        self.autocast = self.device.type == "cuda"
        self.base = open_checkpoint(cfg.model, sliding_window=cfg.sliding_window)
        from mistral7b.engine.llm import checkpoint_tokenizer

        tok = checkpoint_tokenizer(self.base)
        if tok is None:
            raise ValueError(f"{cfg.model} has no tokenizer: fine-tuning needs one to read the data")
        self.examples, skipped = read_jsonl(cfg.data, tok, cfg.seq_len, cfg.skip_bad)
        self.eval_rows = pack(read_jsonl(cfg.eval_data, tok, cfg.seq_len, cfg.skip_bad)[0], cfg.seq_len) \
            if cfg.eval_data else []
        if skipped:
            self.log(f"skipped {skipped} bad record(s) of {cfg.data}")
        base_dtype = torch.bfloat16 if self.autocast and not cfg.full else torch.float32
        self.model = build_model(self.base, base_dtype, self.device, progress=cfg.progress and self.info.main)
        torch.manual_seed(cfg.seed)
        if cfg.full:
            for p in self.model.parameters():
                p.requires_grad_(True)
        else:
            lora.apply_lora(self.model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets)
        self.model.train()
        checkpointing = cfg.activation_checkpointing
        if checkpointing is None:
            tokens = min(cfg.batch_tokens, sum(len(e.ids) for e in self.examples))  # a micro-batch at most
            checkpointing = needs_checkpointing(self.model.args, tokens, base_dtype, cfg.full, self.device)
        if checkpointing:
            _checkpoint_blocks(self.model)
        self.params = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        # PyTorch's default implementation: one tensor at a time on a CPU, batched (foreach) kernels on a GPU,
        # where hundreds of small adapter tensors would otherwise cost a kernel launch each.
        self.optimizer = torch.optim.AdamW(self.params.values(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                           betas=(0.9, 0.95))
        self.net = ddp.wrap(self.model, self.info, self.device)
        self.micro_rows = cfg.batch_tokens // cfg.seq_len
        rows_per_step = self.micro_rows * cfg.grad_accum * self.info.world
        self.stream = RowStream(self.examples, cfg.seq_len, cfg.seed, rows_per_step, cfg.epochs or 1, cfg.max_steps)
        self.epochs = cfg.epochs or 1
        if cfg.epochs is None and cfg.max_steps is None:  # a small file still trains: repeat it, within reason
            self.epochs = min(MAX_AUTO_EPOCHS, max(1, math.ceil(SHORT_RUN / self.stream.steps_per_epoch)))
            if self.epochs > 1:
                self.stream = RowStream(self.examples, cfg.seq_len, cfg.seed, rows_per_step, self.epochs, None)
        # a warm-up of at most a tenth of the run: 10 steps of warm-up in a run of 1 left its one step at lr / 10
        self.warmup = min(cfg.warmup, self.stream.total_steps // 10)
        self.ckpt_root = os.path.join(cfg.out, "checkpoints")
        self.history: list[dict] = []
        self.step = 0

    def log(self, msg: str) -> None:
        if self.info.main:
            tqdm.write(msg, file=sys.stderr)

    def _resume(self) -> None:
        folder = latest_checkpoint(self.ckpt_root)
        if folder is None:
            self.log(f"--resume: no checkpoint in {self.ckpt_root}; starting from step 0")
            return
        state = load_checkpoint(folder, self.params, self.optimizer)
        if state.get("run") != self._run_key():
            raise ValueError(f"{folder}: saved by a run with other settings; use another --out or drop --resume")
        self.step, self.history = state["step"], state["history"]
        self.log(f"resumed from {folder} (step {self.step})")

    def _run_key(self) -> dict:
        keep = ("model", "data", "full", "lora_rank", "lora_alpha", "lora_targets", "epochs", "max_steps", "lr",
                "weight_decay", "batch_tokens", "seq_len", "grad_accum", "warmup", "seed")
        return {k: getattr(self.cfg, k) for k in keep} | {"world": self.info.world}

    def train_step(self, step: int) -> tuple[float, int]:
        """One optimizer step; returns (mean loss over the step's loss tokens, input tokens processed)."""
        cfg, info = self.cfg, self.info
        rows, _ = self.stream.rows(step)
        n_loss = sum(t != IGNORE for r in rows for t in r.targets)
        n_tokens = sum(p >= 0 for r in rows for p in r.positions)
        share = self.micro_rows * cfg.grad_accum
        mine = rows[info.rank * share : (info.rank + 1) * share]
        mine += [empty_row(cfg.seq_len)] * (share - len(mine))
        for g in self.optimizer.param_groups:
            g["lr"] = lr_at(step, cfg.lr, self.warmup, self.stream.total_steps)
        total = 0.0
        for j in range(cfg.grad_accum):
            batch = collate(mine[j * self.micro_rows : (j + 1) * self.micro_rows])
            last = j == cfg.grad_accum - 1
            sync = getattr(self.net, "no_sync", None) if not last and info.enabled else None
            with sync() if sync else _null():
                loss_sum, _ = _token_loss(self.net, batch, self.device, self.autocast)
                (loss_sum * (info.world / max(n_loss, 1))).backward()
            total += float(loss_sum.detach())
        torch.nn.utils.clip_grad_norm_(self.params.values(), cfg.clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return ddp.all_sum(total, info, self.device) / max(n_loss, 1), n_tokens

    @torch.no_grad()
    def evaluate(self) -> float | None:
        if not self.eval_rows:
            return None
        self.model.eval()
        rows = self.eval_rows[self.info.rank :: self.info.world]
        total, count = 0.0, 0
        for lo in range(0, len(rows), self.micro_rows):
            loss_sum, n = _token_loss(self.model, collate(rows[lo : lo + self.micro_rows]), self.device, self.autocast)
            total, count = total + float(loss_sum), count + n
        self.model.train()
        total, count = ddp.all_sum(total, self.info, self.device), ddp.all_sum(count, self.info, self.device)
        return total / max(count, 1)

    def _save(self) -> None:
        if self.info.main:
            save_checkpoint(self.ckpt_root, self.step, self.params, self.optimizer,
                            {"history": self.history, "run": self._run_key()})
            self._plot()
        ddp.barrier(self.info)

    def _plot(self) -> None:
        from mistral7b.finetune.plot import save_loss_curve

        save_loss_curve(self.history, os.path.join(self.cfg.out, "loss_curve.png"))
        atomic_json(os.path.join(self.cfg.out, "history.json"), self.history)

    def run(self) -> dict:
        cfg = self.cfg
        os.makedirs(cfg.out, exist_ok=True)
        if cfg.resume:
            self._resume()
        total = self.stream.total_steps
        if cfg.epochs is None and self.epochs > 1:
            self.log(f"epochs: {self.epochs} (--epochs left out, and one epoch of this data is only "
                     f"{self.stream.steps_per_epoch} step{'s' if self.stream.steps_per_epoch != 1 else ''})")
        if self.warmup < cfg.warmup:
            self.log(f"warm-up: {self.warmup} steps, a tenth of this {total}-step run (--warmup {cfg.warmup} is "
                     f"longer than that)")
        if total < SHORT_RUN:
            self.log(f"warning: only {total} optimizer step{'s' if total != 1 else ''}: too few to change the model "
                     f"much; raise --epochs (one epoch of this data is {self.stream.steps_per_epoch} step"
                     f"{'s' if self.stream.steps_per_epoch != 1 else ''}) or set --max-steps")
        kill_at = int(os.environ.get("MISTRAL7B_FINETUNE_SIGKILL_AT_STEP", "-1"))
        bar = tqdm(total=total, initial=self.step, desc="fine-tuning", unit="step", dynamic_ncols=True,
                   disable=not (cfg.progress and self.info.main))
        start, tokens = time.perf_counter(), 0
        while self.step < total:
            loss, n = self.train_step(self.step)
            self.step += 1
            tokens += n
            entry = {"step": self.step, "loss": loss, "lr": self.optimizer.param_groups[0]["lr"]}
            if self.step % cfg.eval_every == 0 or self.step == total:
                entry["eval_loss"] = self.evaluate()
            self.history.append(entry)
            tps = tokens / max(time.perf_counter() - start, 1e-9)
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tps:.0f}", refresh=False)
            bar.update(1)
            if self.step % cfg.save_every == 0 or self.step == total:
                self._save()
            if self.step == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
        bar.close()
        elapsed = time.perf_counter() - start
        summary = {"steps": self.step, "final_loss": self.history[-1]["loss"] if self.history else None,
                   "eval_loss": self.history[-1].get("eval_loss") if self.history else None,
                   "tokens_per_s": tokens / elapsed if elapsed > 0 else None, "out": cfg.out,
                   "rank": self.info.rank}
        if self.info.main:
            self._export()
            atomic_json(os.path.join(cfg.out, "summary.json"), summary)
        ddp.barrier(self.info)
        ddp.shutdown(self.info)
        return summary

    def _export(self) -> None:
        if self.cfg.full:
            from mistral7b.finetune.export import save_model  # the writers (and gguf) only when writing

            save_model(self.model, self.base, self.cfg.out)
        else:
            lora.save_adapter(self.model, self.cfg.out, base_model=os.path.abspath(self.cfg.model))


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def config_from(**kwargs) -> TrainConfig:
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in kwargs.items() if k in fields})
