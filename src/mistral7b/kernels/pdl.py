"""Programmatic dependent launch (PDL, Hopper and later): a kernel starts while the one before it finishes.

A batch-1 decode step of a 7B model is ~200 kernels back to back in a CUDA graph, and every boundary costs the
next kernel's launch and the previous one's last wave draining, a few microseconds each. With PDL the next
kernel is launched as soon as every program of the current one has passed `gdc_launch_dependents` (at their
start), and it runs `gdc_wait` (griddepcontrol.wait: the previous kernel has completed and its writes are
visible) before it reads or writes anything a kernel before it touches. Only loads of what no kernel of the
step writes may come first: weights, the step's metadata (written before its first kernel), and cache rows of
earlier steps (every step has a kernel launched without PDL, such as the embedding lookup, so the steps before
have finished). So any kernel still sees every earlier kernel's writes, as in plain stream order.

`enabled(device, rows)` says whether to launch with it: a step of at most MAX_ROWS token rows, CUDA compute
capability 9+, a Triton that has the instructions, and MISTRAL7B_PDL not set to 0 (to measure without it).
Kernels take it as a constexpr, so on CPUs (the interpreter) and older GPUs the instructions are not
compiled in at all. Measured on an H200 (bench/README.md): batch-1 decode 237.5 -> 248.1 tok/s with it, while
256-sequence decode lost 1.5% (kernels launched early hold SM slots the running matmul's last wave wants),
so it is kept to one-token steps.
"""

from __future__ import annotations

import functools
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs without Triton
    triton = tl = None
try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # no Triton, or one without grid dependency control: PDL stays off
    gdc_launch_dependents = gdc_wait = None

if triton is not None:

    @triton.jit
    def after_previous(PDL: tl.constexpr):
        """A kernel's first step with PDL: let the next kernel launch, then wait until the one before has
        finished and its writes are visible. Only loads of what no kernel of the step writes may come before it."""
        if PDL:
            gdc_launch_dependents()
            gdc_wait()


@functools.cache
def _capable(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


MAX_ROWS = 1


def enabled(device: torch.device, rows: int) -> bool:
    """Launch a kernel of a step of `rows` token rows on `device` with programmatic dependent launch."""
    if (rows > MAX_ROWS or device.type != "cuda" or gdc_wait is None
            or os.environ.get("MISTRAL7B_PDL", "1") == "0"):
        return False
    return _capable(device.index if device.index is not None else torch.cuda.current_device())


def options(device: torch.device, rows: int) -> dict[str, bool]:
    """A launch's keywords: the kernel's PDL constexpr, and Triton's launch_pdl when it is on (only then:
    Triton's interpreter does not take it)."""
    return {"PDL": True, "launch_pdl": True} if enabled(device, rows) else {"PDL": False}
