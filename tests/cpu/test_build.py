"""Building and loading the CPU extension (mistral7b/cpu/build.py, cpu/__init__.py): one build per CPU capability
this machine can run, the one for the capability in use loaded, and the engine's fallback to its PyTorch ops when
there is none."""

from __future__ import annotations

import os

import pytest
import torch

from mistral7b import cpu
from mistral7b import attention as backends
from mistral7b.cpu import build
from mistral7b.config import ModelArgs


@pytest.fixture
def fresh_load(monkeypatch):
    """load() as in a new process (it looks once a process)."""
    monkeypatch.setattr(cpu, "_tried", False)
    monkeypatch.setattr(cpu, "_loaded", None)


def native_ops(dtype=torch.bfloat16, attention="auto"):
    args = ModelArgs(dim=256, n_layers=1, head_dim=64, hidden_dim=32, n_heads=4, n_kv_heads=2, norm_eps=1e-5,
                     vocab_size=8)
    backend = backends.build(args, 8, 16, dtype, "cpu", attention)
    return backend.ops if backend.name == "cpu_native" else None


def test_no_library_falls_back_with_one_notice(fresh_load, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(build, "BUILD_DIR", tmp_path)  # nothing built there
    assert native_ops() is None
    assert native_ops() is None
    err = capsys.readouterr().err
    assert err.count("no CPU extension built for") == 1 and err.count("\n") == 1


def test_switched_off_by_the_environment(fresh_load, monkeypatch, capsys):
    monkeypatch.setenv("MISTRAL7B_CPU_EXTENSION", "0")
    assert native_ops() is None
    assert capsys.readouterr().err == ""


def test_used_for_float32_and_for_exact_bf16(fresh_load):
    # float32 pools on every build; bf16 pools where the build reproduces oneDNN's bits (AVX-512); and
    # attention="torch" means the PyTorch ops
    ops = cpu.load(notice=False)
    if ops is None:
        pytest.skip("CPU extension not built")
    assert native_ops(torch.float32) is ops
    assert (native_ops() is not None) == ops.EXACT_BF16_ATTENTION
    assert native_ops(attention="torch") is None


def test_every_capability_this_cpu_runs_is_built():
    """scripts/setup.sh builds one library per capability (tests/cpu/test_capabilities.py runs each); a build
    that failed to compile is a failure here, not a skip elsewhere."""
    if os.environ.get("MISTRAL7B_CPU_EXTENSION") == "0":
        pytest.skip("extension switched off")
    missing = [cap for cap in build.runnable_capabilities() if not build.library_path(cap).exists()]
    assert not missing, f"no build for {missing}: run python -m mistral7b.cpu.build"
    assert "DEFAULT" in build.runnable_capabilities()


def test_loads_the_build_of_the_capability_in_use(fresh_load):
    ops = cpu.load(notice=False)
    if ops is None:
        pytest.skip("CPU extension not built")
    assert ops.CAPABILITY == build.capability() == torch.backends.cpu.get_cpu_capability()
    assert ops.__file__ == str(build.library_path())


def test_a_capability_the_cpu_cannot_run_is_refused(monkeypatch):
    monkeypatch.setattr(build, "runnable_capabilities", lambda: ["DEFAULT"])
    with pytest.raises(RuntimeError, match="cannot run a AVX2 build"):
        build.build("AVX2")


def test_no_compiler_is_not_an_error(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(build, "BUILD_DIR", tmp_path)
    monkeypatch.setenv("CXX", "no-such-compiler")
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler"):
        build.build()
    assert build.main([]) == 0
    assert "not built" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_library_name_follows_the_sources(monkeypatch, tmp_path):
    before = {cap: build.library_path(cap) for cap in build.CAPABILITY_FLAGS}
    assert len(set(before.values())) == len(before)  # one name per capability
    for name in (*build.SOURCES, *build.HEADERS):
        (tmp_path / name).write_text((build.HERE / name).read_text())
    monkeypatch.setattr(build, "HERE", tmp_path)
    assert build.library_path("AVX2") == before["AVX2"]
    (tmp_path / "quant.cpp").write_text((tmp_path / "quant.cpp").read_text() + "\n// changed\n")
    assert build.library_path("AVX2") != before["AVX2"]


def test_auto_quantization_loads_float_without_the_extension(monkeypatch, capsys):
    """Packed layers are fast only through the extension's kernels: without it a GGUF file's quantized
    weights load dequantized to float."""
    from mistral7b.loading import open_checkpoint
    from mistral7b.model.build import build_model
    from tests.conftest import smollm2_path

    monkeypatch.setattr(cpu, "_tried", True)
    monkeypatch.setattr(cpu, "_loaded", None)
    ckpt = open_checkpoint(smollm2_path())
    model = build_model(ckpt, torch.float32, progress=False, quantize="auto")
    assert isinstance(model.layers[0].attention.wq, torch.nn.Linear)
