"""Which categories the caller filters, and the OpenAI-shaped moderation request -> response.

The model gives a probability per label; the label it ranks first is its classification (as in the paper:
acceptable, or one category). A text is flagged when that category is one the caller filters, so a caller
who allows, say, financial questions lists every category but that one. `moderation_response` is the plain
function behind `POST /v1/moderations`: the request and response dicts follow OpenAI's moderation endpoint
(`input`, `results[].flagged`, `categories`, `category_scores`), with two optional request fields of ours,
`categories` (what to filter; default all) and `taxonomy` ("paper", 3 categories, or "mistral", 13).
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from typing import Any

from mistral7b.errors import RequestError
from mistral7b.moderation.categories import ACCEPTABLE, check_categories, taxonomy
from mistral7b.moderation.classifier import Item, Moderation, Moderator
from mistral7b.moderation.reliability import reliability

REQUEST_FIELDS = ("input", "model", "categories", "taxonomy")


@dataclass
class Policy:
    taxonomy_name: str = "paper"
    categories: list[str] | None = None  # the categories to filter; None = all

    def __post_init__(self) -> None:
        self.categories = check_categories(self.categories, self.taxonomy_name)

    def flagged_category(self, m: Moderation) -> str | None:
        """The filtered category the text falls in, or None when it passes."""
        return m.label if m.label != ACCEPTABLE and m.label in (self.categories or []) else None

    def title(self, name: str) -> str:
        return next(c.title for c in taxonomy(self.taxonomy_name) if c.name == name)

    def result(self, m: Moderation) -> dict[str, Any]:
        """One entry of `results` in OpenAI's shape; `label` and `acceptable_score` are ours."""
        flagged = self.flagged_category(m)
        return {
            "flagged": flagged is not None,
            "categories": {name: name == flagged for name in m.category_scores()},
            "category_scores": m.category_scores(),
            "label": m.label,
            "acceptable_score": m.scores[ACCEPTABLE],
        }


def _items(value: Any) -> list[Item]:
    """OpenAI's `input`: a string, a list of strings, or a list of {"type": "text", "text": ...} parts; we also
    take {"prompt": ..., "answer": ...} to judge an answer in the context of its prompt."""
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not value:
        raise RequestError("input must be a non-empty string or a non-empty list of strings")
    items: list[Item] = []
    for i, v in enumerate(value):
        if isinstance(v, dict) and v.get("type") == "text":
            v = v.get("text")
        elif isinstance(v, dict) and set(v) == {"prompt", "answer"}:
            v = (v["prompt"], v["answer"])
        elif isinstance(v, dict):
            raise RequestError(f"input[{i}] must be a string, {{\"type\": \"text\", \"text\": ...}} "
                               "or {\"prompt\": ..., \"answer\": ...}")
        items.append(v)
    return items


def moderation_response(moderator: Moderator, request: Any, model_name: str | None = None) -> dict[str, Any]:
    """POST /v1/moderations as a function: OpenAI request dict -> response dict; bad input -> RequestError.
    The response names the request's model, else `model_name`, else the checkpoint's file or folder name."""
    if not isinstance(request, dict):
        raise RequestError("the request body must be a JSON object")
    unknown = [k for k in request if k not in REQUEST_FIELDS]
    if unknown:
        raise RequestError(f"unknown field {unknown[0]!r}: a moderation request takes {', '.join(REQUEST_FIELDS)}")
    if "input" not in request:
        raise RequestError("missing field 'input': the text (or list of texts) to moderate")
    name = request.get("taxonomy", moderator.taxonomy_name)
    if name != moderator.taxonomy_name:
        taxonomy(name)  # unknown names get the error that lists the known ones
        moderator = Moderator(moderator.llm, name, moderator.max_input_tokens)
    policy = Policy(name, request.get("categories"))
    results = moderator.classify(_items(request["input"]))
    return {
        "id": f"modr-{uuid.uuid4().hex}",
        "model": request.get("model") or model_name or os.path.basename(os.path.normpath(moderator.llm.model_path)),
        "results": [policy.result(m) for m in results],
        "reliability": reliability(moderator.llm.model_path),  # ours: how far these flags can be trusted
    }
