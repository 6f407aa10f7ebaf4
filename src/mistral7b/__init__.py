"""mistral7b: the Mistral 7B system (arXiv 2310.06825) in PyTorch.

Public API in vLLM's words: `LLM(model=...)`, `SamplingParams(...)`, `LLM.generate`, `LLM.chat`, `LLM.stream`.
Imports are lazy so `mistral7b --help` and `import mistral7b` stay fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "ModelArgs"]
__version__ = "0.1.0"

if TYPE_CHECKING:
    from mistral7b.config import ModelArgs
    from mistral7b.engine.llm import LLM
    from mistral7b.engine.outputs import CompletionOutput, RequestOutput
    from mistral7b.engine.sampling_params import SamplingParams

_WHERE = {
    "LLM": "mistral7b.engine.llm",
    "SamplingParams": "mistral7b.engine.sampling_params",
    "RequestOutput": "mistral7b.engine.outputs",
    "CompletionOutput": "mistral7b.engine.outputs",
    "ModelArgs": "mistral7b.config",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'mistral7b' has no attribute {name!r}")
