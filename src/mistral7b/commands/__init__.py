"""Extra `mistral7b` sub-commands, one module each (serve, finetune, eval, moderate, ...).

Each command's module defines `register(subparsers) -> None` (options.py holds the options they share), adding
its parser with `set_defaults(func=...)`, where
func(args) returns an exit status. Modules must import heavy dependencies inside func, so `--help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil


def register_all(sub: argparse._SubParsersAction) -> None:
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        if hasattr(module, "register"):
            module.register(sub)
