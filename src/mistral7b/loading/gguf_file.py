"""Reading a GGUF file (llama.cpp): decoded metadata, tensor headers, and one tensor at a time.

`gguf.GGUFReader` memory-maps the file, so opening it reads only the header. Quirks handled here:
tensor shapes in GGUF are listed reversed (ggml `ne` order: columns first); `ReaderTensor.data` is a
numpy view in row-major order, `[rows, cols]` for float types and `[rows, bytes per row]` (uint8) for
quantized and BF16 types, which `gguf.quants.dequantize` turns into float32 `[rows, cols]`.
"""

from __future__ import annotations

import os
from typing import Any

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as QType

from mistral7b.errors import CheckpointError
from mistral7b.loading.safetensors_files import StoredTensor

# F32/F16/BF16 are returned as stored; every type gguf.quants can dequantize is returned as float32.
_DEQUANTIZABLE = set(getattr(gguf.quants, "_type_traits", {})) | {
    QType.F32, QType.F16, QType.BF16, QType.Q4_0, QType.Q4_1, QType.Q5_0, QType.Q5_1, QType.Q8_0,
}


def open_reader(path: str) -> gguf.GGUFReader:
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, IndexError, KeyError, OSError, UnicodeDecodeError, OverflowError) as e:
        raise CheckpointError(f"{path}: not a readable GGUF file, truncated or corrupt ({e})") from None
    if reader.byte_order != "I":
        raise CheckpointError(f"{path}: big-endian GGUF files are not supported")
    size = os.path.getsize(path)
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size:
            raise CheckpointError(f"{path}: truncated GGUF file (tensor {t.name} ends past the end of the file)")
    return reader


def read_metadata(reader: gguf.GGUFReader) -> dict[str, Any]:
    """Every key/value of the file as python values (lists of str for string arrays); GGUF.* counters left out."""
    meta: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        meta[key] = field.contents()
    return meta


def stored_tensors(reader: gguf.GGUFReader, path: str) -> list[StoredTensor]:
    """Headers of the file's tensors, shapes in torch (row-major) order, i.e. reversed from GGUF's."""
    return [
        StoredTensor(path, t.name, tuple(int(d) for d in reversed(t.shape.tolist())), t.tensor_type.name)
        for t in reader.tensors
    ]


def check_type(stored: StoredTensor) -> None:
    if QType[stored.dtype] not in _DEQUANTIZABLE:
        raise CheckpointError(f"{stored.file}: tensor {stored.key} has unsupported GGUF type {stored.dtype}")


def to_torch(tensor: gguf.ReaderTensor) -> torch.Tensor:
    """One tensor as torch, shape in torch order: F32/F16/BF16 as stored, quantized types as float32."""
    shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
    kind = tensor.tensor_type
    if kind in (QType.F32, QType.F16):
        array = np.array(tensor.data, copy=True)
        return torch.from_numpy(array).reshape(shape)
    if kind == QType.BF16:
        array = np.array(tensor.data, copy=True).view(np.int16)
        return torch.from_numpy(array).view(torch.bfloat16).reshape(shape)
    array = gguf.quants.dequantize(tensor.data, kind)
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).reshape(shape)
