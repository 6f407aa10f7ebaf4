"""Build the CPU extension (ops.cpp) ahead of time: `python -m mistral7b.cpu.build`, run by scripts/setup.sh.

One g++ call with PyTorch's headers and libraries (no ninja, no setuptools), with the flags PyTorch builds its
own AVX-512 kernels with, and only where libtorch runs those (its CPU capability is AVX512): the extension calls
ATen's vectorised softmax from the same headers, so it rounds exactly as ATen's own kernel does. Elsewhere
nothing is built and the engine uses its PyTorch ops. The library's file name carries
a tag of everything it depends on (source, torch and Python versions, capability, flags), so a stale build is
never loaded: `mistral7b.cpu.load` looks for exactly that name and otherwise runs without it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("ops.cpp")
BUILD_DIR = Path(__file__).with_name("build")
MODULE = "mistral7b_cpu_ops"
# Compiler flags per ATen CPU capability, as PyTorch builds its own kernels (cmake/Codegen.cmake).
CAPABILITY_FLAGS = {"AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c"]}
COMMON_FLAGS = ["-O3", "-std=c++17", "-shared", "-fPIC", "-fopenmp", "-ffp-contract=off", "-w"]


def capability() -> str:
    return torch.backends.cpu.get_cpu_capability()


def library_path() -> Path | None:
    """Where the extension for this torch, Python and CPU capability lives (None: a capability not built)."""
    cap = capability()
    if cap not in CAPABILITY_FLAGS:
        return None
    key = "\0".join([SOURCE.read_text(), torch.__version__, sys.version, cap, *COMMON_FLAGS, *CAPABILITY_FLAGS[cap]])
    return BUILD_DIR / f"{MODULE}_{cap.lower()}_{hashlib.sha256(key.encode()).hexdigest()[:12]}.so"


def command(out: Path) -> list[str]:
    torch_dir = Path(torch.__file__).parent
    cap = capability()
    return [os.environ.get("CXX", "g++"), *COMMON_FLAGS, *CAPABILITY_FLAGS[cap],
            f"-DCPU_CAPABILITY={cap}", f"-DCPU_CAPABILITY_{cap}", f"-DTORCH_EXTENSION_NAME={MODULE}",
            f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
            f"-I{torch_dir / 'include'}", f"-I{torch_dir / 'include' / 'torch' / 'csrc' / 'api' / 'include'}",
            f"-I{sysconfig.get_paths()['include']}", str(SOURCE), "-o", str(out),
            f"-L{torch_dir / 'lib'}", f"-Wl,-rpath,{torch_dir / 'lib'}", "-lc10", "-ltorch_cpu", "-ltorch",
            "-ltorch_python"]


def build(verbose: bool = False) -> Path:
    """Compile the extension if this configuration has none yet; returns its path. Raises RuntimeError."""
    out = library_path()
    if out is None:
        raise RuntimeError(f"no build flags for CPU capability {capability()}")
    if out.exists():
        return out
    if shutil.which(os.environ.get("CXX", "g++")) is None:
        raise RuntimeError("no C++ compiler (g++ or $CXX)")
    BUILD_DIR.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(dir=BUILD_DIR) as tmp:  # compile aside, then rename: never a half file
        partial = Path(tmp) / out.name
        cmd = command(partial)
        if verbose:
            print(" ".join(cmd), file=sys.stderr)
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"compiling {SOURCE.name} failed:\n{done.stderr[-4000:]}")
        partial.replace(out)
    for stale in BUILD_DIR.glob(f"{MODULE}_*.so"):  # earlier sources or versions
        if stale != out:
            stale.unlink()
    return out


def main() -> int:
    try:
        path = build(verbose="-v" in sys.argv)
    except RuntimeError as exc:
        print(f"mistral7b CPU extension not built ({exc}); decoding on a CPU uses the PyTorch path", file=sys.stderr)
        return 0  # optional: the engine runs without it
    print(f"mistral7b CPU extension: {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
