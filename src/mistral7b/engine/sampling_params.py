"""SamplingParams: what a request asks of the sampler, named as in vLLM and the OpenAI API, validated once.

Every field has a range; a value outside it is a `RequestError` naming the field, never a crash later.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from mistral7b.errors import RequestError

MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 256


@dataclass
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.validate()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    def validate(self) -> None:
        def number(name: str, lo: float, hi: float, lo_open: bool = False) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise RequestError(f"{name} must be a finite number, got {value!r}")
            if value < lo or value > hi or (lo_open and value == lo):
                bound = "(" if lo_open else "["
                raise RequestError(f"{name} must be in {bound}{lo}, {hi}], got {value!r}")

        def integer(name: str, lo: int, hi: int) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
                raise RequestError(f"{name} must be an integer in [{lo}, {hi}], got {value!r}")

        integer("max_tokens", 1, 1 << 20)
        number("temperature", 0.0, 100.0)
        number("top_p", 0.0, 1.0, lo_open=True)
        integer("top_k", 0, 1 << 30)
        number("min_p", 0.0, 1.0)
        number("repetition_penalty", 0.0, 100.0, lo_open=True)
        if self.seed is not None:
            integer("seed", 0, 2**63 - 1)
        if len(self.stop) > MAX_STOP_STRINGS:
            raise RequestError(f"stop: at most {MAX_STOP_STRINGS} strings, got {len(self.stop)}")
        for s in self.stop:
            if not isinstance(s, str) or not s or len(s) > MAX_STOP_LENGTH:
                raise RequestError(f"stop: each entry must be a non-empty string of at most {MAX_STOP_LENGTH} characters")
        for t in self.stop_token_ids:
            if isinstance(t, bool) or not isinstance(t, int) or t < 0:
                raise RequestError(f"stop_token_ids: each entry must be a non-negative integer, got {t!r}")
