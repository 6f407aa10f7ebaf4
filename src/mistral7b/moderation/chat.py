"""`chat --moderate input,output`: refuse flagged prompts, and hold back answers until they are checked.

With output moderation the answer is generated in full before any of it is shown (streaming to the screen
would show text that may then be withheld); it is then classified with its prompt and either printed or
replaced by a notice naming the category. A refused or withheld exchange is left out of the history.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TYPE_CHECKING

from mistral7b.errors import RequestError

if TYPE_CHECKING:
    from mistral7b.engine.llm import LLM

SIDES = ("input", "output")


def add_chat_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("moderation (self-reflection)")
    g.add_argument("--moderate", help="what the model checks itself: input, output or input,output")
    g.add_argument("--moderate-taxonomy", default="paper", choices=["paper", "mistral"])
    g.add_argument("--moderate-categories", help="comma-separated categories to filter (default: all)")


class ChatGuard:
    def __init__(self, llm: LLM, sides: list[str], taxonomy_name: str = "paper",
                 categories: str | list[str] | None = None):
        from mistral7b.moderation.classifier import Moderator
        from mistral7b.moderation.policy import Policy

        self.input, self.output = "input" in sides, "output" in sides
        self.policy = Policy(taxonomy_name, categories)
        self.moderator = Moderator(llm, taxonomy_name)

    def _notice(self, what: str, text: str, answer: str | None) -> str | None:
        m = self.moderator.classify_one(text, answer)
        name = self.policy.flagged_category(m)
        if name is None:
            return None
        return f"[{what} was flagged as {self.policy.title(name)} (p={m.scores[name]:.2f})]"

    def check_input(self, history: list[dict]) -> str | None:
        """A refusal notice for the last user message, or None when it may be answered."""
        if not self.input:
            return None
        return self._notice("refused: your message", history[-1]["content"], None)

    def check_output(self, history: list[dict], answer: str) -> str | None:
        """A notice replacing the answer, or None when it may be shown."""
        if not self.output or not answer.strip():
            return None
        return self._notice("withheld: the answer", history[-1]["content"], answer)


def chat_guard(a: argparse.Namespace) -> Callable[[LLM], ChatGuard] | None:
    """Check the --moderate options (before the model loads); returns how to build the guard, or None."""
    if getattr(a, "moderate", None) is None:
        return None
    from mistral7b.moderation.policy import Policy

    sides = [s.strip() for s in a.moderate.split(",") if s.strip()]
    if not sides or any(s not in SIDES for s in sides):
        raise RequestError(f"--moderate takes input, output or input,output; got {a.moderate!r}")
    Policy(a.moderate_taxonomy, a.moderate_categories)  # unknown category names fail here
    def make(llm: LLM) -> ChatGuard:
        from mistral7b.moderation.reliability import announce

        announce(llm.model_path)
        return ChatGuard(llm, sides, a.moderate_taxonomy, a.moderate_categories)

    return make
