"""What every route shares, in the API server's process: the processor (tokenizer, prompt checks), the async
engine, metrics, the served model name, and the per-server settings. Also the token texts that logprobs report.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from starlette.concurrency import run_in_threadpool

from mistral7b.engine.generation_config import NEUTRAL, SamplingDefaults
from mistral7b.engine.processor import Processor
from mistral7b.errors import RequestError
from mistral7b.server.async_engine import AsyncEngine
from mistral7b.server.errors import APIError
from mistral7b.server.metrics import Metrics

CONTEXT_TOKENS = 4  # tokens decoded before a token to find its own text (leading spaces, merged bytes)


@dataclass
class ServerState:
    processor: Processor
    engine: AsyncEngine
    metrics: Metrics
    served_name: str
    api_key: str | None = None
    moderate_input: bool = False  # chats are screened by the model before they run (--moderate input)
    moderate_output: bool = False  # answers are screened before they are sent (--moderate output)
    max_logprobs: int = 20
    safe_prompt: bool = False  # the guardrail prompt on every chat, whatever the request says
    sampling_defaults: SamplingDefaults = NEUTRAL  # for the sampling fields a request leaves out

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.served_name:
            raise APIError(404, f"the model `{model}` does not exist; this server serves `{self.served_name}`",
                           "invalid_request_error", param="model", code="model_not_found")

    @property
    def max_model_len(self) -> int:
        return self.processor.max_model_len

    def _check_text(self, text: str) -> None:
        # A token is rarely longer than a few dozen characters: refuse hopeless texts before tokenizing them.
        if len(text) > 64 * self.max_model_len:
            raise RequestError(f"the prompt has {len(text)} characters, far beyond the context of "
                               f"{self.max_model_len} tokens")

    async def encode_prompt(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            self._check_text(prompt)
            return await run_in_threadpool(self.processor.encode_prompt, prompt)
        return self.processor.encode_prompt(prompt)

    async def encode_chat(self, messages: list[dict[str, Any]], safe_prompt: bool,
                          tools: list[dict[str, Any]] | None = None) -> list[int]:
        self._check_text("".join(m.get("content") or "" for m in messages))
        return await run_in_threadpool(self.processor.encode_chat, messages, safe_prompt or self.safe_prompt, tools)

    def special_tokens(self) -> dict[str, int]:
        """The BOS and EOS tokens by their vocabulary text."""
        tok = self.processor.tokenizer
        if tok is None:
            return {}
        return {tok.id_to_piece(i): i for i in (tok.bos_id, tok.eos_id) if i is not None}

    # ---- token texts for logprobs --------------------------------------------------------------------
    def token_text(self, context: Sequence[int], token: int) -> str:
        """The text `token` adds after `context` (the last few tokens are enough)."""
        return self.texts_after(context, [token])[0]

    def texts_after(self, context: Sequence[int], tokens: Sequence[int]) -> list[str]:
        """The text each of `tokens` would add after `context`: the context decoded once, each distinct token
        once (a sampled token is usually among its own top logprobs)."""
        tok = self.processor.tokenizer
        if tok is None:
            return [f"<{t}>" for t in tokens]
        ctx = list(context[-CONTEXT_TOKENS:])
        before = tok.decode(ctx) if ctx else ""
        texts: dict[int, str] = {}
        for t in tokens:
            if t not in texts:
                after = tok.decode(ctx + [t])
                texts[t] = after[len(before) :] if after.startswith(before) else tok.decode([t])
        return [texts[t] for t in tokens]

    def token_texts(self, ids: Sequence[int], start: int = 0) -> list[str]:
        """Texts of ids[start:], each in the context of the ids before it."""
        return [self.token_text(ids[:i], ids[i]) for i in range(start, len(ids))]

    def top_texts(self, context: Sequence[int], top: list[tuple[int, float]] | None) -> list[tuple[str, float]]:
        top = top or []
        return list(zip(self.texts_after(context, [t for t, _ in top]), (lp for _, lp in top)))

    def sampled_texts(self, context: Sequence[int], token: int, top: list[tuple[int, float]] | None
                      ) -> tuple[str, list[tuple[str, float]]]:
        """A sampled token's text and its top logprobs' texts, from one decode of the context."""
        top = top or []
        texts = self.texts_after(context, [token] + [t for t, _ in top])
        return texts[0], list(zip(texts[1:], (lp for _, lp in top)))


def usage(prompt_tokens: int, completion_tokens: int, cached: int = 0) -> dict[str, Any]:
    out: dict[str, Any] = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                           "total_tokens": prompt_tokens + completion_tokens}
    if cached:
        out["prompt_tokens_details"] = {"cached_tokens": cached}
    return out
