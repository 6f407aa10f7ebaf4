"""Self-reflection moderation: the model scores each label as its own answer; softmax gives a probability each.

For one text and a taxonomy with K categories there are K+1 candidate replies ("acceptable" and one label word
per category). Each candidate is the start of the assistant's reply to the chat-formatted classification
prompt; all candidates of a batch of texts are scored in one batched pass on top of the shared pre-fill
(candidates.py: the numbers of `LLM.score` on the full sequences, without repeating the prompt K+1 times). A
candidate's log-likelihood is the sum of its tokens' log-probabilities, and a softmax over the K+1 sums gives
P(label | text): a distribution over the labels, not free text to parse, so the model cannot answer off the
list.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Union

from mistral7b.errors import RequestError
from mistral7b.moderation.candidates import score_continuations
from mistral7b.moderation.categories import ACCEPTABLE, taxonomy
from mistral7b.moderation.prompt import classification_prompt

if TYPE_CHECKING:
    from mistral7b.engine.llm import LLM

# A text to judge: a user prompt, or (prompt, answer) to judge an answer in its context.
Item = Union[str, tuple[str, str]]
DEFAULT_MAX_INPUT_TOKENS = 4096


@dataclass
class Moderation:
    label: str  # the most likely label: "acceptable" or a category name
    scores: dict[str, float]  # "acceptable" and every category of the taxonomy; they sum to 1

    def category_scores(self) -> dict[str, float]:
        return {k: v for k, v in self.scores.items() if k != ACCEPTABLE}


def _softmax(values: list[float]) -> list[float]:
    top = max(values)
    exps = [math.exp(v - top) for v in values]
    total = sum(exps)
    return [e / total for e in exps]


def check_item(i: int, item: object) -> tuple[str, str | None]:
    """(text, answer) of one item, or RequestError naming it: a non-empty string or a pair of them."""
    text, answer = item if isinstance(item, tuple) and len(item) == 2 else (item, None)
    for part, value in (("", text), (".answer", answer)):
        if value is None and part:
            continue
        if not isinstance(value, str):
            raise RequestError(f"input[{i}]{part} must be a string, got {type(value).__name__}")
        if not value.strip():
            raise RequestError(f"input[{i}]{part} is empty: there is no text to moderate")
    return text, answer  # type: ignore[return-value]


class Moderator:
    """Classifies texts with the model held by `llm`, in one taxonomy ("paper": 3 categories, "mistral": 13)."""

    def __init__(self, llm: LLM, taxonomy_name: str = "paper", max_input_tokens: int = DEFAULT_MAX_INPUT_TOKENS):
        if llm.tokenizer is None:
            raise RequestError(f"{llm.model_path} has no tokenizer, so it cannot moderate text")
        llm._single_process("moderation")
        self.llm = llm
        self.taxonomy_name = taxonomy_name
        self.categories = taxonomy(taxonomy_name)
        self.names = [ACCEPTABLE, *(c.name for c in self.categories)]
        labels = [ACCEPTABLE, *(c.label for c in self.categories)]
        self.label_ids = [llm.tokenizer.encode(label, add_bos=False) for label in labels]
        overhead = len(self._prompt_ids("", None)) + max(len(ids) for ids in self.label_ids)
        self.max_input_tokens = min(max_input_tokens, llm.max_model_len - overhead)

    def _prompt_ids(self, text: str, answer: str | None) -> list[int]:
        message = classification_prompt(self.categories, text, answer)
        return self.llm.encode_chat([{"role": "user", "content": message}])

    def _check(self, i: int, item: object) -> tuple[str, str | None]:
        text, answer = check_item(i, item)
        n = len(self.llm.tokenizer.encode(text + (answer or ""), add_bos=False))
        if n > self.max_input_tokens:
            raise RequestError(f"input[{i}] is {n} tokens long; moderation takes at most {self.max_input_tokens}")
        return text, answer

    def classify(self, items: Sequence[Item]) -> list[Moderation]:
        """One Moderation per item; every candidate of every item is scored in one batched `LLM.score` call."""
        if isinstance(items, (str, tuple)):
            raise RequestError("classify takes a list of texts")
        if not items:
            raise RequestError("input is empty: give at least one text to moderate")
        checked = [self._check(i, item) for i, item in enumerate(items)]
        prompts = [self._prompt_ids(text, answer) for text, answer in checked]
        # Similar lengths share a batch, so little of each batch is padding; the cache is copied once per
        # label, so a batch holds at most max_batch_size (prompt, label) rows.
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        per_batch = max(1, self.llm.max_batch_size // len(self.label_ids))
        loglik: list[list[float]] = [[] for _ in prompts]
        for lo in range(0, len(order), per_batch):
            batch = order[lo : lo + per_batch]
            rows = score_continuations(self.llm.model, [prompts[i] for i in batch], self.label_ids,
                                       self.llm.chunk_size)
            for i, row in zip(batch, rows):
                loglik[i] = row
        out = []
        for row in loglik:
            scores = dict(zip(self.names, _softmax(row)))
            out.append(Moderation(max(scores, key=scores.__getitem__), scores))
        return out

    def classify_one(self, text: str, answer: str | None = None) -> Moderation:
        return self.classify([text if answer is None else (text, answer)])[0]
