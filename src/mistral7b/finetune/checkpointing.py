"""Training checkpoints: written atomically, read back without pickle, resumed exactly.

A checkpoint is a folder `checkpoints/step_NNNNNN/` with
- `tensors.safetensors`: the trainable parameters (`param.<name>`), the optimizer's per-parameter tensors
  (`optim.<index>.<key>`: AdamW's step, exp_avg, exp_avg_sq) and the RNG states (`rng.cpu`, `rng.cuda`);
- `state.json`: everything else (step, optimizer hyper-parameters, loss history, the run's settings).
The folder is written under a temporary name and renamed into place, then `checkpoints/latest.json` is replaced
atomically to point at it; a run killed at any moment leaves the previous checkpoint intact. The data order and
the learning rate are pure functions of (seed, step), so the step number restores them.

Nothing is read with pickle/torch.load: a checkpoint folder from elsewhere can only hold tensors and JSON.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mistral7b.errors import CheckpointError

LATEST = "latest.json"
KEEP = 2


def atomic_json(path: str, data: Any) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_safetensors(path: str, tensors: dict[str, torch.Tensor]) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp, metadata={"format": "pt"})
    os.replace(tmp, path)


def save_checkpoint(root: str, step: int, params: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
                    state: dict[str, Any]) -> str:
    """Write checkpoint `step` under root/ and point latest.json at it; keep the last KEEP checkpoints."""
    os.makedirs(root, exist_ok=True)
    name = f"step_{step:06d}"
    final, tmp = os.path.join(root, name), os.path.join(root, f".{name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    tensors = {f"param.{k}": v for k, v in params.items()}
    opt = optimizer.state_dict()
    for idx, st in opt["state"].items():
        for key, value in st.items():
            tensors[f"optim.{idx}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
              os.path.join(tmp, "tensors.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(tmp, "state.json"), "w", encoding="utf-8") as f:
        json.dump({**state, "step": step, "param_groups": opt["param_groups"]}, f)
        f.flush()
        os.fsync(f.fileno())
    if os.path.exists(final):  # left by a run killed between the rename and latest.json: same step, redo it
        shutil.rmtree(final)
    os.replace(tmp, final)
    atomic_json(os.path.join(root, LATEST), {"step": step, "dir": name})
    done = sorted(d for d in os.listdir(root) if d.startswith("step_") and d != name)
    for old in done[: max(0, len(done) - (KEEP - 1))]:
        shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    return final


def latest_checkpoint(root: str) -> str | None:
    path = os.path.join(root, LATEST)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            folder = os.path.join(root, json.load(f)["dir"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: unreadable ({e})") from None
    if not os.path.isdir(folder):
        raise CheckpointError(f"{path}: points at missing checkpoint {folder}")
    return folder


def load_checkpoint(folder: str, params: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore parameters (in place), optimizer and RNG from a checkpoint folder; return its state.json."""
    try:
        tensors = load_file(os.path.join(folder, "tensors.safetensors"))
        with open(os.path.join(folder, "state.json"), encoding="utf-8") as f:
            state = json.load(f)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{folder}: unreadable checkpoint ({e})") from None
    with torch.no_grad():
        for name, p in params.items():
            key = f"param.{name}"
            if key not in tensors or tensors[key].shape != p.shape:
                raise CheckpointError(f"{folder}: checkpoint does not match this model ({name})")
            p.copy_(tensors[key].to(p.dtype))
    opt_state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, idx, sub = key.split(".", 2)
            opt_state.setdefault(int(idx), {})[sub] = value
    optimizer.load_state_dict({"state": opt_state, "param_groups": state.pop("param_groups")})
    torch.set_rng_state(tensors["rng.cpu"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    return state
