"""What generation returns, in vLLM's shape: a RequestOutput per prompt holding CompletionOutputs."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CompletionOutput:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] | None = None
    finish_reason: str | None = None  # "stop" (EOS, stop token or string) or "length"


@dataclass
class RequestOutput:
    request_id: int
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False


@dataclass
class StreamEvent:
    """One step of one request while streaming: the new token and the text it made safe to show."""

    request_id: int
    token_id: int | None
    text: str
    logprob: float | None
    finish_reason: str | None
