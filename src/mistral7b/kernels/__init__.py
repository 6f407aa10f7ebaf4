"""Triton GPU kernels. Their modules import Triton, which costs ~0.15 s: callers import them only on the
kernel path, and ask `available()` (no import) first."""

from __future__ import annotations

import importlib.util


def available() -> bool:
    """True when the triton package is installed (without importing it)."""
    return importlib.util.find_spec("triton") is not None
