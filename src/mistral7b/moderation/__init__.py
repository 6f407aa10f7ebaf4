"""Self-reflection moderation (paper section 5): the model classifies text as acceptable or as a category.

categories.py: the paper's 3 and Mistral's 13 categories; prompt.py: our classification prompt;
candidates.py: label log-likelihoods with a shared pre-fill; classifier.py: `Moderator`, a probability per
label; policy.py: which categories the caller filters, and the OpenAI-shaped request -> response function;
chat.py: `--moderate input,output` for chat. Imports are lazy so the CLI's --help stays fast.
"""

from __future__ import annotations

from typing import Any

_WHERE = {
    "ACCEPTABLE": "categories", "MISTRAL": "categories", "PAPER": "categories", "Category": "categories",
    "Moderation": "classifier", "Moderator": "classifier", "Policy": "policy", "moderation_response": "policy",
}
__all__ = list(_WHERE)


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
