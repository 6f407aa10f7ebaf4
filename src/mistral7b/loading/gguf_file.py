"""Reading a GGUF file (llama.cpp): decoded metadata, tensor headers, and one tensor at a time.

Our `GGUFFile` (gguf_reader.py) memory-maps the file, so opening it reads only the header. Tensor shapes in
GGUF are listed reversed (ggml `ne` order: columns first) and come here in torch order; `GGUFTensor.data` is a
numpy view, `[rows, cols]` for F32/F16 and `[rows, bytes per row]` (uint8) for quantized and BF16 types,
which `gguf.quants.dequantize` turns into float32 `[rows, cols]`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from mistral7b.errors import CheckpointError
from mistral7b.loading.gguf_reader import GGUFFile, GGUFFormatError, GGUFTensor
from mistral7b.loading.safetensors_files import StoredTensor

_DIRECT = {"F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"}


def _dequantizable() -> set[str]:
    """F32/F16/BF16 are returned as stored; every type gguf.quants can dequantize is returned as float32."""
    import gguf

    return _DIRECT | {t.name for t in getattr(gguf.quants, "_type_traits", {})}


def open_reader(path: str) -> GGUFFile:
    try:
        reader = GGUFFile(path)
    except GGUFFormatError as e:
        if "truncated" in str(e):
            raise CheckpointError(f"{path}: truncated GGUF file ({e})") from None
        raise CheckpointError(f"{path}: not a readable GGUF file, truncated or corrupt ({e})") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e})") from None
    return reader


def read_metadata(reader: GGUFFile) -> dict[str, Any]:
    """Every key/value of the file as python values (lists of str for string arrays)."""
    return dict(reader.metadata)


def stored_tensors(reader: GGUFFile, path: str) -> list[StoredTensor]:
    """Headers of the file's tensors, shapes in torch (row-major) order, i.e. reversed from GGUF's."""
    return [StoredTensor(path, t.name, t.shape, t.tensor_type) for t in reader.tensors]


def check_type(stored: StoredTensor) -> None:
    if stored.dtype not in _DIRECT and stored.dtype not in _dequantizable():
        raise CheckpointError(f"{stored.file}: tensor {stored.key} has unsupported GGUF type {stored.dtype}")


def to_torch(tensor: GGUFTensor) -> torch.Tensor:
    """One tensor as torch, shape in torch order: F32/F16/BF16 as stored, quantized types as float32."""
    shape = tensor.shape
    kind = tensor.tensor_type
    if kind in ("F32", "F16"):
        array = np.array(tensor.data, copy=True)
        return torch.from_numpy(array).reshape(shape)
    if kind == "BF16":
        array = np.array(tensor.data, copy=True).view(np.int16)
        return torch.from_numpy(array).view(torch.bfloat16).reshape(shape)
    import gguf

    array = gguf.quants.dequantize(tensor.data, gguf.GGMLQuantizationType[kind])
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).reshape(shape)
