"""Building and loading the CPU extension (mistral7b/cpu/build.py, cpu/__init__.py), and the engine's fallback
to its PyTorch ops when there is none."""

from __future__ import annotations

import pytest
import torch

from mistral7b import cpu
from mistral7b.cache.paged import PagedKVCache
from mistral7b.cpu import build
from mistral7b.config import ModelArgs


@pytest.fixture
def fresh_load(monkeypatch):
    """load() as in a new process (it looks once a process)."""
    monkeypatch.setattr(cpu, "_tried", False)
    monkeypatch.setattr(cpu, "_loaded", None)


def tiny_cache(dtype=torch.bfloat16, attention="auto"):
    args = ModelArgs(dim=256, n_layers=1, head_dim=64, hidden_dim=32, n_heads=4, n_kv_heads=2, norm_eps=1e-5,
                     vocab_size=8)
    return PagedKVCache(args, 8, 16, dtype, attention=attention)


def test_no_library_falls_back_with_one_notice(fresh_load, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(build, "BUILD_DIR", tmp_path)  # nothing built there
    assert tiny_cache().native is None
    assert tiny_cache().native is None
    err = capsys.readouterr().err
    assert err.count("no CPU extension built") == 1 and err.count("\n") == 1


def test_switched_off_by_the_environment(fresh_load, monkeypatch, capsys):
    monkeypatch.setenv("MISTRAL7B_CPU_EXTENSION", "0")
    assert tiny_cache().native is None
    assert capsys.readouterr().err == ""


def test_used_only_where_it_gives_the_same_bits(fresh_load):
    # float32 caches keep MKL's matmuls (their summation order is not the extension's), and attention="torch"
    # means the PyTorch ops
    if cpu.load(notice=False) is None:
        pytest.skip("CPU extension not built")
    assert tiny_cache().native is not None
    assert tiny_cache(torch.float32).native is None
    assert tiny_cache(attention="torch").native is None


def test_no_compiler_is_not_an_error(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(build, "BUILD_DIR", tmp_path)
    monkeypatch.setenv("CXX", "no-such-compiler")
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler"):
        build.build()
    assert build.main() == 0
    assert "not built" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_library_name_follows_the_source(monkeypatch, tmp_path):
    before = build.library_path()
    source = tmp_path / "ops.cpp"
    source.write_text(build.SOURCE.read_text() + "\n// changed\n")
    monkeypatch.setattr(build, "SOURCE", source)
    assert build.library_path() != before
