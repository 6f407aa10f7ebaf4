"""Process-level settings for a lean CPU run: how glibc's allocator returns memory.

Loading converts hundreds of tensors through short-lived buffers of a few MB. glibc raises its mmap
threshold after the first large free, so later buffers come from the heap and fragmentation keeps them
resident: loading SmolLM2 left ~300 MB of dead heap. A fixed threshold keeps large buffers in mmap, so
freed memory really goes back to the system.
"""

from __future__ import annotations

import ctypes
import sys

_M_MMAP_THRESHOLD = -3
_tuned = False


def tune_allocator(threshold: int = 128 * 1024) -> None:
    global _tuned
    if _tuned or not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, threshold)
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass
    _tuned = True
