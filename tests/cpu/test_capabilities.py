"""The CPU-sensitive tests again under every CPU capability PyTorch can dispatch to on this machine.

PyTorch picks its CPU kernels (and their rounding, and once the packed layout of int4 weights) by the
capability it detects; ATEN_CPU_CAPABILITY lowers it per process, and the extension follows with the build for
that capability. The suite itself runs under the machine's best one; here each other one (an AVX-512 machine
also runs AVX2 and DEFAULT, an AVX2 machine DEFAULT) runs the extension's op and kernel tests, the quantized
layers' tests and the default path on the embedded model, in a fresh process each. The extension must be built
for each (a skip for a missing build fails here). On CPUs with AMX, oneDNN rounds some bf16 matmuls in another
order than its avx512_core_bf16 kernels, which the extension's exact bf16 attention reproduces: those tests run
once more with oneDNN held to AVX512_CORE_BF16, where every bit must match.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from mistral7b.cpu import build

FILES = ["tests/cpu/test_ops.py", "tests/cpu/test_quant.py", "tests/cpu/test_threads.py",
         "tests/model/test_quantize.py",
         "tests/model/test_cpu_decode.py",
         "tests/engine/test_default_path.py", "tests/cpu/test_build.py::test_loads_the_build_of_the_capability_in_use"]
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CURRENT = torch.backends.cpu.get_cpu_capability()
OTHERS = [cap for cap in build.runnable_capabilities() if cap != CURRENT]


def run_pytest(env: dict[str, str], *args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *args],
                          cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True, timeout=1800)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-6000:]
    assert "CPU extension not built" not in out, out[-3000:]
    return out


@pytest.mark.skipif(os.environ.get("MISTRAL7B_CPU_EXTENSION") == "0", reason="extension switched off")
@pytest.mark.parametrize("capability", OTHERS or [pytest.param(None, marks=pytest.mark.skip("one capability"))])
def test_cpu_sensitive_tests_under_capability(capability):
    check = subprocess.run([sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"],
                           env={**os.environ, "ATEN_CPU_CAPABILITY": capability.lower()}, capture_output=True,
                           text=True)
    assert check.stdout.strip() == capability
    # transformers' own check of the reference is not CPU-sensitive here: it runs once, in the suite
    run_pytest({"ATEN_CPU_CAPABILITY": capability.lower()}, *FILES, "--deselect",
               "tests/engine/test_default_path.py::test_reference_equals_transformers_on_a_long_prompt")


@pytest.mark.skipif(not (CURRENT == "AVX512" and torch.cpu._is_amx_tile_supported()),
                    reason="oneDNN takes AMX kernels only on CPUs with AMX")
def test_bf16_attention_bits_with_onednn_below_amx():
    out = run_pytest({"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"}, "tests/cpu/test_ops.py", "-k", "bf16")
    assert " passed" in out and "skipped" not in out.split("\n")[-2]
