"""Open a checkpoint of any supported format and stream its tensors under the model's (native) names.

`open_checkpoint` detects the format (native Mistral, Hugging Face, GGUF), builds the `ModelArgs`, and
checks every tensor header against them before a single weight is read: missing, unexpected and
misshapen tensors are reported as one `CheckpointError` line naming the file. `Checkpoint.tensors()`
then yields one tensor at a time, renamed to the native key and with wq/wk rows in the native
(interleaved-pairs) rotary layout, so the model can load a 7B checkpoint without holding two copies.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from safetensors import SafetensorError, safe_open

from mistral7b.config import ModelArgs, read_json
from mistral7b.errors import CheckpointError
from mistral7b.loading import gguf_file, layout
from mistral7b.loading.gguf_blocks import GGUFBlocks, read_blocks
from mistral7b.loading.safetensors_files import StoredTensor, hf_files, native_files, pickle_error, read_header

_FLOAT_DTYPES = {"F32", "F16", "BF16", "F64"}


@dataclass
class Checkpoint:
    args: ModelArgs
    format: str  # "native" | "hf" | "gguf"
    path: str  # folder, or the .gguf file
    metadata: dict[str, Any] = field(default_factory=dict)  # GGUF key/values (tokenizer.* included); {} otherwise
    _entries: list[tuple[str, StoredTensor]] = field(default_factory=list, repr=False)  # (native name, stored)
    _reader: Any = field(default=None, repr=False)  # the memory-mapped gguf.GGUFReader

    def stored_types(self) -> dict[str, str]:
        """Native name -> type as stored (safetensors dtype such as BF16, or GGUF type such as Q4_1)."""
        return {name: stored.dtype for name, stored in self._entries}

    def tensor_names(self) -> list[str]:
        """Native names, in file order."""
        return [name for name, _ in self._entries]

    def tensors(self, packed: frozenset[str] = frozenset(),
                select: Callable[[str], tuple[int, int, int] | None] | None = None,
                ) -> Iterator[tuple[str, torch.Tensor | GGUFBlocks]]:
        """(native name, tensor) one at a time, native rotary layout, dtype as stored (quantized -> float32).

        GGUF tensors whose type is in `packed` (a subset of gguf_blocks.PACKABLE) come as `GGUFBlocks`
        instead, for quantized layers to use without re-quantizing. `select(name)` -> (dim, start, stop) asks
        for a slice only (tensor parallelism): safetensors files read just those rows or columns; GGUF tensors
        are read whole, then sliced. Slices of q/k rows hold whole heads, so the rotary layout is fixed per head.
        """
        if select is not None and self.format == "gguf":
            for name, value in self.tensors(packed):
                spec = select(name)
                yield name, value if spec is None else value.narrow(spec[0], spec[1], spec[2] - spec[1])  # type: ignore[union-attr]
            return
        if self.format == "gguf":
            by_name = {t.name: t for t in self._reader.tensors}
            for name, stored in self._entries:
                tensor = by_name[stored.key]
                if stored.dtype in packed and len(stored.shape) == 2:
                    value = read_blocks(tensor.data, stored.dtype, *stored.shape)
                else:
                    value = gguf_file.to_torch(tensor)
                self._reader.release(tensor)  # every value above is a copy: the file pages can go
                yield name, value
            return
        for file, group in itertools.groupby(self._entries, key=lambda entry: entry[1].file):
            with _open_safetensors(file) as handle:
                for name, stored in group:
                    spec = select(name) if select is not None else None
                    try:
                        if spec is None:
                            tensor = handle.get_tensor(stored.key)
                        else:
                            dim, start, stop = spec
                            index = (slice(start, stop),) if dim == 0 else (slice(None), slice(start, stop))
                            tensor = handle.get_slice(stored.key)[index]
                    except SafetensorError as e:
                        raise CheckpointError(f"{file}: cannot read tensor {stored.key} ({e})") from None
                    if self.format == "hf" and layout.rotary_heads(name, self.args) is not None:
                        tensor = layout.permute_from_hf(tensor, tensor.shape[0] // self.args.head_dim)
                    yield name, tensor


def _open_safetensors(file: str) -> Any:
    try:
        return safe_open(file, framework="pt")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{file}: truncated or corrupt safetensors file ({e})") from None


def open_checkpoint(path: str, sliding_window: int | None | Literal["keep"] = "keep") -> Checkpoint:
    """Detect the format of `path` (folder or .gguf file), read its config, and validate its tensor headers.

    `sliding_window` overrides the attention window ("keep": what the config says; GGUF has no key for
    Mistral 7B v0.1's 4096, so pass it here).
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such file or folder")
    fmt, target = _detect(path)
    if fmt == "gguf":
        ckpt = _open_gguf(target)
    else:
        ckpt = _open_safetensors_checkpoint(target, fmt)
    if sliding_window != "keep":
        ckpt.args = dataclasses.replace(ckpt.args, sliding_window=sliding_window)
    return ckpt


def _detect(path: str) -> tuple[str, str]:
    if os.path.isfile(path):
        if path.endswith(".gguf"):
            return "gguf", path
        raise CheckpointError(f"{path}: not a checkpoint (expected a folder or a .gguf file)")
    names = set(os.listdir(path))
    has_consolidated = any(n.startswith("consolidated") and n.endswith(".safetensors") for n in names)
    if "params.json" in names and (has_consolidated or "config.json" not in names):
        return "native", path
    if "config.json" in names:
        return "hf", path
    ggufs = sorted(n for n in names if n.endswith(".gguf"))
    if len(ggufs) == 1:
        return "gguf", os.path.join(path, ggufs[0])
    if len(ggufs) > 1:
        raise CheckpointError(f"{path}: {len(ggufs)} .gguf files ({', '.join(ggufs)}); pass the one to load")
    raise pickle_error(path) or CheckpointError(
        f"{path}: no recognizable checkpoint (expected params.json, config.json or a .gguf file)"
    )


def _open_safetensors_checkpoint(folder: str, fmt: str) -> Checkpoint:
    if fmt == "native":
        config_file = os.path.join(folder, "params.json")
        args = ModelArgs.from_params_json(read_json(config_file), source=config_file)
        files = native_files(folder)
    else:
        config_file = os.path.join(folder, "config.json")
        args = ModelArgs.from_hf_config(read_json(config_file), source=config_file)
        files = hf_files(folder)
    stored = [t for file in files for t in read_header(file)]
    for t in stored:
        if t.dtype not in _FLOAT_DTYPES:
            raise CheckpointError(f"{t.file}: tensor {t.key} has unsupported dtype {t.dtype}")
    entries = _validate(stored, fmt, args, folder)
    return Checkpoint(args=args, format=fmt, path=folder, _entries=entries)


def _open_gguf(file: str) -> Checkpoint:
    reader = gguf_file.open_reader(file)
    meta = gguf_file.read_metadata(reader)
    stored = gguf_file.stored_tensors(reader, file)
    names = {t.key for t in stored}
    arch = meta.get("general.architecture")
    config_meta = dict(meta)
    embd = next((t for t in stored if t.key == "token_embd.weight"), None)
    if (arch and not meta.get(f"{arch}.vocab_size") and not meta.get("tokenizer.ggml.tokens") and embd is not None
            and len(embd.shape) == 2):
        config_meta[f"{arch}.vocab_size"] = embd.shape[0]  # no vocab key: trust the embedding matrix
    args = ModelArgs.from_gguf_metadata(config_meta, has_output="output.weight" in names, source=file)
    for t in stored:
        gguf_file.check_type(t)
    entries = _validate(stored, "gguf", args, file)
    return Checkpoint(args=args, format="gguf", path=file, metadata=meta, _entries=entries, _reader=reader)


def _validate(stored: list[StoredTensor], fmt: str, args: ModelArgs, where: str) -> list[tuple[str, StoredTensor]]:
    """Check stored headers against the config; return (native name, stored) pairs in file order."""

    def stored_name(name: str) -> str:
        return name if fmt == "native" else layout.from_native_name(name, fmt)

    expected = layout.expected_shapes(args)
    entries: list[tuple[str, StoredTensor]] = []
    seen: dict[str, StoredTensor] = {}
    for t in stored:
        if t.key.endswith(layout.IGNORED_SUFFIXES):
            continue
        name = t.key if fmt == "native" else layout.to_native_name(t.key, fmt)
        if name == "output.weight" and args.tied_embeddings:
            continue  # tied: the output matrix is the embedding; some writers store a redundant copy
        if name is None or name not in expected:
            raise CheckpointError(f"{t.file}: unexpected tensor {t.key} (not part of a model with this config)")
        if name in seen:
            raise CheckpointError(f"{t.file}: tensor {t.key} is stored twice (also in {seen[name].file})")
        want = expected[name]
        if t.shape != want:
            if name in ("tok_embeddings.weight", "output.weight") and t.shape[1:] == want[1:]:
                raise CheckpointError(
                    f"{t.file}: vocab size mismatch: config says {args.vocab_size} but tensor {t.key} "
                    f"has {t.shape[0]} rows"
                )
            raise CheckpointError(
                f"{t.file}: tensor {t.key} has shape {list(t.shape)}, expected {list(want)} from the config"
            )
        seen[name] = t
        entries.append((name, t))
    for name in expected:
        if name not in seen:
            raise CheckpointError(f"{where}: missing tensor {stored_name(name)}")
    return entries

