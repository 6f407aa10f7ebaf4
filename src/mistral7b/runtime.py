"""Process-level settings for a lean CPU run: how glibc's allocator returns memory.

Loading converts hundreds of tensors through short-lived buffers of a few MB. glibc raises its mmap
threshold after the first large free, so later buffers come from the heap and fragmentation keeps them
resident: loading SmolLM2 left ~300 MB of dead heap. A fixed threshold keeps large buffers in mmap, so
freed memory really goes back to the system (`tune_allocator`).

Computing is the other way round: every step allocates and frees the same few-MB buffers (a pre-fill chunk's
activations, each int4 weight dequantized for it). In mmap each one is mapped, faulted in page by page,
zeroed and unmapped again every time: 60% of a 500-token pre-fill of SmolLM2 on the 2-core dev machine
(1,005 -> 410 ms with the buffers in the heap). So once a model is loaded, `allocator_for_compute` moves the
thresholds up: such buffers come from the heap and are reused, step after step.
"""

from __future__ import annotations

import ctypes
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
LOAD_MMAP_THRESHOLD = 128 * 1024
LOAD_TRIM_THRESHOLD = 128 * 1024  # glibc's default
COMPUTE_MMAP_THRESHOLD = 32 << 20  # glibc's largest: buffers up to 32 MB come from the heap
COMPUTE_TRIM_THRESHOLD = 64 << 20  # free heap kept for the next step before it goes back to the system


def _mallopt(settings: dict[int, int]) -> bool:
    """Set glibc malloc parameters; False where there is no glibc (nothing to tune)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return all(mallopt(param, value) == 1 for param, value in settings.items())


def tune_allocator(threshold: int = LOAD_MMAP_THRESHOLD) -> bool:
    """Before loading: large buffers in mmap, so that what loading frees goes back to the system."""
    return _mallopt({_M_MMAP_THRESHOLD: threshold, _M_TRIM_THRESHOLD: LOAD_TRIM_THRESHOLD})


def allocator_for_compute() -> bool:
    """After loading: step buffers up to 32 MB in the heap, reused from one step to the next."""
    return _mallopt({_M_MMAP_THRESHOLD: COMPUTE_MMAP_THRESHOLD, _M_TRIM_THRESHOLD: COMPUTE_TRIM_THRESHOLD})
