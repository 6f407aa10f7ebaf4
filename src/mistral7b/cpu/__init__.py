"""CPU kernels for decoding, as a C++ extension (ops.cpp) built ahead of time by scripts/setup.sh
(`python -m mistral7b.cpu.build`), never on a command's path to its first token.

`load()` returns the built module, or None with a one-line notice on stderr (once a process) when there is
none for this torch, Python and CPU: the engine then decodes with the PyTorch path, which gives the same bits.
MISTRAL7B_CPU_EXTENSION=0 turns it off (for A/B timing).
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys
from types import ModuleType

_loaded: ModuleType | None = None
_tried = False


def load(notice: bool = True) -> ModuleType | None:
    global _loaded, _tried
    if _tried:
        return _loaded
    _tried = True
    if os.environ.get("MISTRAL7B_CPU_EXTENSION", "1") == "0":
        return None
    from mistral7b.cpu.build import MODULE, library_path

    path = library_path()
    if path is None or not path.exists():
        if notice:
            print("mistral7b: no CPU extension built (python -m mistral7b.cpu.build); decoding with PyTorch ops",
                  file=sys.stderr)
        return None
    loader = importlib.machinery.ExtensionFileLoader(MODULE, str(path))
    spec = importlib.util.spec_from_file_location(MODULE, path, loader=loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    _loaded = module
    return module
