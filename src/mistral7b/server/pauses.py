"""What can stall every stream of a server at once, counted so a benchmark (or Prometheus) can see it: the time
Python's garbage collector holds a process (per process, through `gc.callbacks`), and the CUDA caching
allocator's retries (a request it could not serve from its cache: it frees every cached block, synchronises and
allocates again, which takes long with the KV cache filling the card)."""

from __future__ import annotations

import gc
import time
from typing import Any

import torch

RETRIES_EVERY = 16  # reads of the allocator's statistics: one in this many (a dict of ~100 entries each time)


class GcPauses:
    """Seconds this process spent in garbage collection since `install`, and the longest single pause."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.longest = 0.0
        self._start: float | None = None

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        elif self._start is not None:
            pause = time.perf_counter() - self._start
            self.seconds += pause
            self.longest = max(self.longest, pause)
            self._start = None


_pauses: GcPauses | None = None


def install() -> GcPauses:
    """Start counting this process's GC pauses (once; later calls return the same counter)."""
    global _pauses
    if _pauses is None:
        _pauses = GcPauses()
        gc.callbacks.append(_pauses._callback)
    return _pauses


def gc_seconds() -> float:
    return _pauses.seconds if _pauses is not None else 0.0


class AllocRetries:
    """The CUDA caching allocator's retries on a device, read one time in RETRIES_EVERY."""

    def __init__(self, device: torch.device):
        self.device, self.calls, self.value = device, 0, 0

    def read(self) -> int:
        if self.device.type == "cuda" and self.calls % RETRIES_EVERY == 0:
            self.value = int(torch.cuda.memory_stats(self.device).get("num_alloc_retries", 0))
        self.calls += 1
        return self.value
