"""Our lean GGUF header reader against the gguf package's GGUFReader (the oracle) on real files."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from mistral7b.errors import CheckpointError
from mistral7b.loading import open_checkpoint
from mistral7b.loading.gguf_reader import TYPES, GGUFFile
from tests.conftest import smollm2_path


def test_type_table_matches_gguf():
    for kind, (name, block, size) in TYPES.items():
        qtype = gguf.GGMLQuantizationType(kind)
        assert qtype.name == name
        assert gguf.GGML_QUANT_SIZES[qtype] == (block, size)


def test_metadata_and_tensors_equal_ggufreader():
    path = smollm2_path()
    ours, ref = GGUFFile(path), gguf.GGUFReader(path)
    for key, field in ref.fields.items():
        if key.startswith("GGUF."):
            continue
        want = field.contents()
        got = ours.metadata[key]
        if isinstance(want, float):
            assert got == pytest.approx(want)
        else:
            assert got == want, key
    assert len(ours.tensors) == len(ref.tensors)
    for a, b in zip(ours.tensors, ref.tensors):
        assert a.name == b.name and a.tensor_type == b.tensor_type.name
        assert a.shape == tuple(int(d) for d in reversed(b.shape.tolist()))
        assert a.data_offset == b.data_offset and a.n_bytes == b.n_bytes
        assert np.array_equal(np.asarray(a.data).reshape(-1).view(np.uint8),
                              np.asarray(b.data).reshape(-1).view(np.uint8))


def test_cut_header_is_one_error_line(tmp_path):
    bad = tmp_path / "cut.gguf"
    with open(smollm2_path(), "rb") as f:
        bad.write_bytes(f.read(300_000))  # inside the vocabulary arrays
    with pytest.raises(CheckpointError, match="cut.gguf"):
        open_checkpoint(str(bad))
