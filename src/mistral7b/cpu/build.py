"""Build the CPU extension ahead of time: `python -m mistral7b.cpu.build`, run by scripts/setup.sh.

PyTorch picks its CPU kernels at start-up by the CPU's capability (DEFAULT, AVX2, AVX512; the environment
variable ATEN_CPU_CAPABILITY lowers it), and the extension follows it: one build per capability, each compiled
with the flags PyTorch builds that capability's kernels with, so ATen's vector code in the extension (softmax,
exp, the sum order of a norm) gives the bits of the kernels libtorch runs. This command builds every capability
this CPU can run (an AVX2 build runs on any x86 CPU with AVX2, an AVX-512 build only on AVX-512 ones), and
`mistral7b.cpu.load` takes the one for the capability in use. g++ with PyTorch's headers and libraries, each
source compiled on its own core, no ninja or setuptools.

A library's file name carries a tag of everything it depends on (sources, torch and Python versions,
capability, flags), so a stale build is never loaded: `load` looks for exactly that name and otherwise runs
without it.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

HERE = Path(__file__).parent
SOURCES = ("module.cpp", "attention.cpp", "blocks.cpp", "fused.cpp", "quant.cpp", "sample.cpp", "threads.cpp")
HEADERS = ("ops.h", "threads.h")
BUILD_DIR = HERE / "build"
MODULE = "mistral7b_cpu_ops"
# Compiler flags per ATen CPU capability, as PyTorch builds its own kernels (cmake/Codegen.cmake); F16C for the
# float16 scales of int4 weights (every AVX2 CPU has it).
CAPABILITY_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c"],
    "DEFAULT": [],
}
COMMON_FLAGS = ["-O3", "-std=c++17", "-fPIC", "-fopenmp", "-ffp-contract=off", "-w"]


def capability() -> str:
    """The build for the capability ATen dispatches to now; capabilities of other architectures (SVE, VSX)
    take the portable build."""
    cap = torch.backends.cpu.get_cpu_capability()
    return cap if cap in CAPABILITY_FLAGS else "DEFAULT"


def runnable_capabilities() -> list[str]:
    """Every build this CPU can run, whatever ATEN_CPU_CAPABILITY says now (it can be changed per process)."""
    caps = ["DEFAULT"]
    if torch.cpu._is_avx2_supported():
        caps.append("AVX2")
    if torch.cpu._is_avx512_supported():
        caps.append("AVX512")
    return caps


def library_path(cap: str | None = None) -> Path:
    """Where the extension for this torch, Python and CPU capability lives (built or not)."""
    cap = cap or capability()
    texts = [(HERE / name).read_text() for name in (*SOURCES, *HEADERS)]
    key = "\0".join([*texts, torch.__version__, sys.version, cap, *COMMON_FLAGS, *CAPABILITY_FLAGS[cap]])
    return BUILD_DIR / f"{MODULE}_{cap.lower()}_{hashlib.sha256(key.encode()).hexdigest()[:12]}.so"


def _compiler() -> str:
    return os.environ.get("CXX", "g++")


def _compile_command(cap: str, source: Path, obj: Path) -> list[str]:
    torch_dir = Path(torch.__file__).parent
    return [_compiler(), *COMMON_FLAGS, *CAPABILITY_FLAGS[cap], "-c",
            f"-DCPU_CAPABILITY={cap}", f"-DCPU_CAPABILITY_{cap}", f"-DTORCH_EXTENSION_NAME={MODULE}",
            f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
            f"-I{torch_dir / 'include'}", f"-I{torch_dir / 'include' / 'torch' / 'csrc' / 'api' / 'include'}",
            f"-I{sysconfig.get_paths()['include']}", str(source), "-o", str(obj)]


def _link_command(objects: list[Path], out: Path) -> list[str]:
    lib = Path(torch.__file__).parent / "lib"
    return [_compiler(), "-shared", "-fopenmp", *map(str, objects), "-o", str(out), f"-L{lib}", f"-Wl,-rpath,{lib}",
            "-lc10", "-ltorch_cpu", "-ltorch", "-ltorch_python"]


def _run(cmd: list[str], verbose: bool) -> None:
    if verbose:
        print(" ".join(cmd), file=sys.stderr)
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed:\n{done.stderr[-4000:]}")


def build(cap: str | None = None, verbose: bool = False) -> Path:
    """Compile the extension for `cap` (default: the capability in use) if it has no build yet; returns its
    path. Raises RuntimeError (no compiler, a compile error, a capability this CPU cannot run)."""
    cap = cap or capability()
    if cap not in CAPABILITY_FLAGS:
        raise RuntimeError(f"no build flags for CPU capability {cap}")
    if cap not in runnable_capabilities():
        raise RuntimeError(f"this CPU cannot run a {cap} build")
    out = library_path(cap)
    if out.exists():
        return out
    if shutil.which(_compiler()) is None:
        raise RuntimeError("no C++ compiler (g++ or $CXX)")
    BUILD_DIR.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(dir=BUILD_DIR) as tmp:  # compile aside, then rename: never a half file
        objects = [Path(tmp) / f"{Path(s).stem}.o" for s in SOURCES]
        with ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:
            for result in [pool.submit(_run, _compile_command(cap, HERE / s, o), verbose)
                           for s, o in zip(SOURCES, objects)]:
                result.result()
        partial = Path(tmp) / out.name
        _run(_link_command(objects, partial), verbose)
        partial.replace(out)
    for stale in BUILD_DIR.glob(f"{MODULE}_{cap.lower()}_*.so"):  # earlier sources or versions
        if stale != out:
            stale.unlink()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--capability", choices=sorted(CAPABILITY_FLAGS), action="append",
                   help="build only these (default: every capability this CPU can run)")
    p.add_argument("-v", "--verbose", action="store_true", help="print the compiler commands")
    a = p.parse_args(argv)
    status = 0
    for cap in a.capability or runnable_capabilities():
        try:
            path = build(cap, verbose=a.verbose)
        except RuntimeError as exc:
            print(f"mistral7b CPU extension for {cap} not built ({exc}); on such a CPU the engine uses its "
                  "PyTorch ops", file=sys.stderr)
            continue
        print(f"mistral7b CPU extension ({cap}): {path}", file=sys.stderr)
    return status  # optional: the engine runs without it


if __name__ == "__main__":
    sys.exit(main())
