"""SamplingParams: what a request asks of the sampler, named as in vLLM and the OpenAI API, validated once.

Every field has a range; a value outside it is a `RequestError` naming the field, never a crash later.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from mistral7b.engine.structured_output import StructuredOutput
from mistral7b.errors import RequestError

MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 256
MAX_N = 128
MAX_TOP_LOGPROBS = 20
MAX_LOGIT_BIAS = 1024


@dataclass
class SamplingParams:
    """Sampling settings of one request.

    n: completions per prompt (each its own sequence; with a seed, completion i draws from seed + i).
    min_tokens: EOS and stop_token_ids are banned, and stop strings ignored, until this many tokens exist.
    presence_penalty / frequency_penalty: OpenAI's, over the generated tokens: logit -= presence * [count > 0]
        + frequency * count. repetition_penalty: CTRL-style, over prompt and output (HF, vLLM).
    logprobs: report the chosen tokens' log-probabilities; top_logprobs: also the k most likely tokens.
    prompt_logprobs: None, or report every prompt token's log-probability with the k most likely tokens
        (k may be 0): what `echo` with `logprobs` needs. prompt_logprobs_from: only from this prompt position on
        (scoring a continuation: its first token's position); the blocks wholly before it may come from the
        prefix cache. With prompt_logprobs, max_tokens may be 0: the prompt is scored, nothing is generated.
    logit_bias: token id -> bias added to its logit, in [-100, 100].
    structured: the output must match a JSON schema, regex, choice or grammar (engine/structured_output.py).
    """

    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    min_tokens: int = 0
    n: int = 1
    logprobs: bool = False
    top_logprobs: int = 0
    prompt_logprobs: int | None = None
    prompt_logprobs_from: int = 0
    logit_bias: dict[int, float] = field(default_factory=dict)
    structured: StructuredOutput | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.logit_bias = dict(self.logit_bias or {})
        self.validate()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

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

        integer("max_tokens", 0 if self.prompt_logprobs is not None else 1, 1 << 20)
        integer("prompt_logprobs_from", 0, 1 << 30)
        number("temperature", 0.0, 100.0)
        number("top_p", 0.0, 1.0, lo_open=True)
        integer("top_k", 0, 1 << 30)
        number("min_p", 0.0, 1.0)
        number("repetition_penalty", 0.0, 100.0, lo_open=True)
        number("presence_penalty", -2.0, 2.0)
        number("frequency_penalty", -2.0, 2.0)
        if self.seed is not None:
            integer("seed", 0, 2**63 - 1)
        integer("min_tokens", 0, self.max_tokens)
        integer("n", 1, MAX_N)
        integer("top_logprobs", 0, MAX_TOP_LOGPROBS)
        if self.prompt_logprobs is not None:
            integer("prompt_logprobs", 0, MAX_TOP_LOGPROBS)
        if len(self.stop) > MAX_STOP_STRINGS:
            raise RequestError(f"stop: at most {MAX_STOP_STRINGS} strings, got {len(self.stop)}")
        for s in self.stop:
            if not isinstance(s, str) or not s or len(s) > MAX_STOP_LENGTH:
                raise RequestError(f"stop: each entry must be a non-empty string of at most {MAX_STOP_LENGTH} "
                                   "characters")
        for t in self.stop_token_ids:
            if isinstance(t, bool) or not isinstance(t, int) or t < 0:
                raise RequestError(f"stop_token_ids: each entry must be a non-negative integer, got {t!r}")
        if len(self.logit_bias) > MAX_LOGIT_BIAS:
            raise RequestError(f"logit_bias: at most {MAX_LOGIT_BIAS} entries, got {len(self.logit_bias)}")
        for t, b in self.logit_bias.items():
            if isinstance(t, bool) or not isinstance(t, int) or t < 0:
                raise RequestError(f"logit_bias: keys must be non-negative token ids, got {t!r}")
            if isinstance(b, bool) or not isinstance(b, (int, float)) or not -100 <= b <= 100:
                raise RequestError(f"logit_bias: values must be numbers in [-100, 100], got {b!r}")
        if self.structured is not None:
            if not isinstance(self.structured, StructuredOutput):
                raise RequestError(f"structured must be a StructuredOutput, got {type(self.structured).__name__}")
            self.structured.validate()
