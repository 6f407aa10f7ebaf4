"""A lean GGUF header parser: metadata as plain Python values, tensors as memory-mapped numpy views.

`gguf.GGUFReader` builds a numpy object for every element of every metadata array; for a 49k-token
vocabulary with its merges that is ~2.3 s and ~200 MB before the first weight is touched, which is most of
the time to first token on a small model. This reader walks the same header (GGUF v2/v3, little-endian) with
one pass over a memory map, decodes string arrays straight to `str`, and leaves tensor data mapped.
The `gguf` package is still what dequantizes, quantizes and writes; it is imported only for that (its import
alone costs ~0.6 s and ~40 MB), and for the block sizes of types missing from the table below.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

_MAGIC = b"GGUF"
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
          7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
_STRING, _ARRAY = 8, 9
# ggml type id -> (name, block size in elements, block size in bytes); checked against gguf's own table in tests.
TYPES = {0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22),
         7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 40), 10: ("Q2_K", 256, 84),
         11: ("Q3_K", 256, 110), 12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210),
         15: ("Q8_K", 256, 292), 24: ("I8", 1, 1), 25: ("I16", 1, 2), 26: ("I32", 1, 4), 27: ("I64", 1, 8),
         28: ("F64", 1, 8), 30: ("BF16", 1, 2)}


def type_info(kind: int) -> tuple[str, int, int]:
    if kind in TYPES:
        return TYPES[kind]
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        qtype = GGMLQuantizationType(kind)
    except ValueError:
        raise GGUFFormatError(f"unknown tensor type id {kind}") from None
    return (qtype.name, *GGML_QUANT_SIZES[qtype])


class GGUFFormatError(ValueError):
    """The file is not a GGUF file of a version we read, or its header is cut short or inconsistent."""


@dataclass
class GGUFTensor:
    name: str
    shape: tuple[int, ...]  # torch (row-major) order: the reverse of GGUF's ne order
    tensor_type: str  # ggml type name: F32, F16, BF16, Q8_0, Q4_1, ...
    data_offset: int  # absolute offset in the file
    n_bytes: int
    data: np.ndarray  # [rows, cols] for F32/F16, uint8 [rows, bytes per row] for BF16 and quantized types


class GGUFFile:
    def __init__(self, path: str):
        with open(path, "rb") as f:
            try:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            except ValueError as e:  # an empty file cannot be mapped
                raise GGUFFormatError(f"cannot map the file ({e})") from None
        self._buf = memoryview(self._map)
        self._pos = 0
        try:
            self._parse()
        except (struct.error, IndexError, UnicodeDecodeError, OverflowError) as e:
            raise GGUFFormatError(f"header cut short or corrupt ({e})") from None

    def release(self, tensor: GGUFTensor) -> None:
        """Drop the file pages of a tensor already converted, so they stop counting in resident memory."""
        start = tensor.data_offset // mmap.PAGESIZE * mmap.PAGESIZE
        end = tensor.data_offset + tensor.n_bytes
        if hasattr(self._map, "madvise"):
            self._map.madvise(mmap.MADV_DONTNEED, start, end - start)

    # ---- primitive reads ---------------------------------------------------------------------------
    def _unpack(self, fmt: str) -> Any:
        value = struct.unpack_from(fmt, self._buf, self._pos)[0]
        self._pos += struct.calcsize(fmt)
        return value

    def _string(self) -> str:
        n = self._unpack("<Q")
        if self._pos + n > len(self._buf):
            raise GGUFFormatError("a string runs past the end of the file")
        raw = bytes(self._buf[self._pos : self._pos + n])
        self._pos += n
        return raw.decode("utf-8", errors="replace")

    def _value(self, kind: int) -> Any:
        if kind == _STRING:
            return self._string()
        if kind == _ARRAY:
            item, count = self._unpack("<I"), self._unpack("<Q")
            if item == _STRING:
                return [self._string() for _ in range(count)]
            if item in _NUMPY:
                dtype = np.dtype(_NUMPY[item])
                end = self._pos + count * dtype.itemsize
                if end > len(self._buf):
                    raise GGUFFormatError("an array runs past the end of the file")
                values = np.frombuffer(self._buf, dtype=dtype, count=count, offset=self._pos).tolist()
                self._pos = end
                return values
            return [self._value(item) for _ in range(count)]
        if kind in _SCALARS:
            return self._unpack(_SCALARS[kind])
        raise GGUFFormatError(f"unknown metadata value type {kind}")

    # ---- the header ----------------------------------------------------------------------------------
    def _parse(self) -> None:
        if bytes(self._buf[:4]) != _MAGIC:
            raise GGUFFormatError("not a GGUF file (bad magic bytes)")
        self._pos = 4
        self.version = self._unpack("<I")
        if self.version not in (2, 3):
            raise GGUFFormatError(f"GGUF version {self.version} is not supported (big-endian file, or too new)")
        n_tensors, n_kv = self._unpack("<Q"), self._unpack("<Q")
        self.metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = self._string()
            self.metadata[key] = self._value(self._unpack("<I"))
        infos = []
        for _ in range(n_tensors):
            name = self._string()
            n_dims = self._unpack("<I")
            ne = [self._unpack("<Q") for _ in range(n_dims)]
            kind, offset = self._unpack("<I"), self._unpack("<Q")
            infos.append((name, ne, kind, offset))
        alignment = int(self.metadata.get("general.alignment", 32))
        start = (self._pos + alignment - 1) // alignment * alignment
        self.tensors = [self._tensor(name, ne, kind, start + offset) for name, ne, kind, offset in infos]

    def _tensor(self, name: str, ne: list[int], kind: int, offset: int) -> GGUFTensor:
        qtype, block, type_size = type_info(kind)
        shape = tuple(reversed(ne)) or (1,)
        cols = shape[-1]
        rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
        if cols % block:
            raise GGUFFormatError(f"tensor {name}: row of {cols} is not a whole number of {qtype} blocks")
        row_bytes = cols // block * type_size
        n_bytes = rows * row_bytes
        if offset + n_bytes > len(self._buf):
            raise GGUFFormatError(f"truncated file: tensor {name} ends past the end of the file")
        if qtype == "F32":
            data = np.frombuffer(self._buf, np.float32, rows * cols, offset).reshape(rows, cols)
        elif qtype == "F16":
            data = np.frombuffer(self._buf, np.float16, rows * cols, offset).reshape(rows, cols)
        else:
            data = np.frombuffer(self._buf, np.uint8, n_bytes, offset).reshape(rows, row_bytes)
        return GGUFTensor(name, shape, qtype, offset, n_bytes, data)
