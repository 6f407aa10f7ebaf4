"""Which `.safetensors` files make up a native or Hugging Face checkpoint, and what their headers say.

Only headers are read here (names, shapes, dtypes), so a checkpoint is validated before any weight is
loaded. Pickle files (`.bin`, `.pth`) are never opened: they can run code when unpickled.
"""

from __future__ import annotations

import glob
import os
import re
from dataclasses import dataclass

from safetensors import SafetensorError, safe_open

from mistral7b.config import read_json
from mistral7b.errors import CheckpointError

PICKLE_SUFFIXES = (".bin", ".pth", ".pt", ".ckpt", ".pkl")
_SHARD_RE = re.compile(r"^consolidated-(\d+)-of-(\d+)\.safetensors$")


@dataclass(frozen=True)
class StoredTensor:
    """One tensor as a file's header describes it."""

    file: str
    key: str
    shape: tuple[int, ...]
    dtype: str


def read_header(file: str) -> list[StoredTensor]:
    """The tensors of one safetensors file, in file (offset) order, without reading their data."""
    if not os.path.isfile(file):
        raise CheckpointError(f"{file}: safetensors file not found")
    try:
        with safe_open(file, framework="pt") as f:
            keys = f.offset_keys() if hasattr(f, "offset_keys") else f.keys()
            out = []
            for key in keys:
                sl = f.get_slice(key)
                out.append(StoredTensor(file, key, tuple(sl.get_shape()), sl.get_dtype()))
            return out
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{file}: truncated or corrupt safetensors file ({e})") from None


def pickle_error(folder: str) -> CheckpointError | None:
    """The error for a folder that only holds pickle weights, or None when it holds none."""
    found = sorted(n for n in os.listdir(folder) if n.endswith(PICKLE_SUFFIXES))
    if not found:
        return None
    return CheckpointError(
        f"{folder}: only safetensors and GGUF checkpoints are loaded; found pickle weights "
        f"({', '.join(found[:3])}{', ...' if len(found) > 3 else ''}): convert them to safetensors first"
    )


def _no_weights(folder: str, wanted: str) -> CheckpointError:
    return pickle_error(folder) or CheckpointError(f"{folder}: no {wanted} found")


def native_files(folder: str) -> list[str]:
    """consolidated.safetensors, else every consolidated-N-of-M shard (all M required), else any *.safetensors."""
    single = os.path.join(folder, "consolidated.safetensors")
    if os.path.isfile(single):
        return [single]
    shards: dict[int, str] = {}
    total = 0
    for name in os.listdir(folder):
        m = _SHARD_RE.match(name)
        if m:
            shards[int(m.group(1))] = os.path.join(folder, name)
            total = max(total, int(m.group(2)))
    if shards:
        for i in range(1, total + 1):
            if i not in shards:
                width = len(_SHARD_RE.match(os.path.basename(next(iter(shards.values())))).group(1))
                missing = f"consolidated-{i:0{width}d}-of-{total:0{width}d}.safetensors"
                raise CheckpointError(f"{os.path.join(folder, missing)}: shard {i} of {total} is missing")
        return [shards[i] for i in sorted(shards)]
    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    if not files:
        raise _no_weights(folder, "consolidated.safetensors (native checkpoint with params.json)")
    return files


def hf_files(folder: str) -> list[str]:
    """Shards listed in model.safetensors.index.json, else model.safetensors, else any *.safetensors."""
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index}: missing or empty 'weight_map'")
        shards = sorted(set(weight_map.values()))
        for shard in shards:
            if not os.path.isfile(os.path.join(folder, shard)):
                raise CheckpointError(f"{index}: names shard {shard!r}, which is missing from {folder}")
        return [os.path.join(folder, s) for s in shards]
    single = os.path.join(folder, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    if not files:
        raise _no_weights(folder, "model.safetensors or model.safetensors.index.json (Hugging Face checkpoint)")
    return files
