"""CPU kernels as a C++ extension (*.cpp here), built ahead of time by scripts/setup.sh for every CPU capability
the machine can run (`python -m mistral7b.cpu.build`), never on a command's path to its first token.

`load()` returns the build for the capability PyTorch dispatches to in this process (build.capability()), or
None with a one-line notice on stderr (once a process) when there is none: the engine then runs its PyTorch
ops. What a build offers: float32 and bfloat16 fused ops and int4/int8 matmuls everywhere; bfloat16 decode
attention with the PyTorch path's exact bits only where it is `EXACT_BF16_ATTENTION` (AVX-512 builds).
MISTRAL7B_CPU_EXTENSION=0 turns it off (for A/B timing).
"""

from __future__ import annotations

import contextlib
import importlib.machinery
import importlib.util
import os
import sys
from collections.abc import Iterator
from types import ModuleType

import torch

_loaded: ModuleType | None = None
_tried = False


def load(notice: bool = True) -> ModuleType | None:
    global _loaded, _tried
    if _tried:
        return _loaded
    _tried = True
    if os.environ.get("MISTRAL7B_CPU_EXTENSION", "1") == "0":
        return None
    from mistral7b.cpu.build import MODULE, capability, library_path

    path = library_path()
    if not path.exists():
        if notice:
            print(f"mistral7b: no CPU extension built for {capability()} (python -m mistral7b.cpu.build); "
                  "running PyTorch ops", file=sys.stderr)
        return None
    loader = importlib.machinery.ExtensionFileLoader(MODULE, str(path))
    spec = importlib.util.spec_from_file_location(MODULE, path, loader=loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    _loaded = module
    return module



@contextlib.contextmanager
def decode_threads() -> Iterator[None]:
    """Within: ATen single-threaded, the extension's pool keeping torch's thread count. A decode step's heavy
    ops are the extension's; what ATen still runs (argmax and the sampler over the logits, above ATen's
    parallel grain for a large vocabulary) gains little from OpenMP and, with another process on the machine,
    waits at OpenMP's barrier for a preempted thread: decoding on 2 threads beside a busy process ran at 82
    tok/s against 104 on 1 thread, and at 98 with ATen single-threaded (bench/README.md)."""
    ops = load(notice=False)
    threads = torch.get_num_threads()
    if ops is None or threads == 1:
        yield
        return
    ops.set_threads(threads)
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        ops.set_threads(0)
