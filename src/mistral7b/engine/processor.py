"""Processor: a request's prompt (text, token ids or a chat) to checked token ids, and the checks a request must
pass before it runs, once: everything about a request that needs no weights.

It is a separate object from the engine so that the API server's own process (server/runner.py) holds one,
answering bad requests and tokenizing without a round trip to the engine's process; `LLM` holds one too.
`PromptLimits` is what it needs to know of the engine: plain numbers, fixed once the KV cache is allocated.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Union

from mistral7b.cache.block_manager import max_blocks_per_seq
from mistral7b.engine.sampling_params import SamplingParams
from mistral7b.engine.structured_output import Grammars
from mistral7b.errors import RequestError
from mistral7b.guardrails import with_safe_prompt
from mistral7b.tokenizer import Tokenizer
from mistral7b.tokenizer.base import has_tool_messages

Prompt = Union[str, Sequence[int], dict]


def check_token_ids(ids: Sequence[int], vocab_size: int) -> None:
    """RequestError naming the first element of `ids` that is not a token id of this vocabulary."""
    for t in ids:
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size:
            raise RequestError(f"token id {t!r} is not in [0, {vocab_size})")


@dataclass(frozen=True)
class PromptLimits:
    """What bounds a request on this engine: the vocabulary, the context, and the KV cache's blocks."""

    vocab_size: int
    max_model_len: int
    chunk_size: int
    block_size: int
    sliding_window: int | None
    num_blocks: int

    def check(self, prompt_ids: Sequence[int], params: SamplingParams) -> None:
        """RequestError unless this prompt with `params.max_tokens` new tokens can run here."""
        if not prompt_ids:
            raise RequestError("the prompt is empty")
        vocab = self.vocab_size
        check_token_ids(prompt_ids, vocab)
        for name, ids in (("logit_bias", params.logit_bias), ("stop_token_ids", params.stop_token_ids)):
            outside = [t for t in ids if not 0 <= t < vocab]
            if outside:  # vLLM refuses these too; a bias outside the vocabulary has no logit to add to
                raise RequestError(f"{name}: token id {outside[0]} is not in [0, {vocab})")
        if params.max_tokens == 0 and len(prompt_ids) < 2:
            raise RequestError("scoring a prompt (max_tokens 0) needs at least 2 tokens: the first has no "
                               "log-probability")
        total = len(prompt_ids) + params.max_tokens - (1 if params.max_tokens == 0 else 0)  # a scored last token
        # is predicted, never read
        if total > self.max_model_len:
            raise RequestError(
                f"this model's maximum context length is {self.max_model_len} tokens; the request has "
                f"{len(prompt_ids)} prompt tokens and asks for {params.max_tokens} more ({total} in all)"
            )
        need = max_blocks_per_seq(total, self.chunk_size, self.block_size, self.sliding_window)
        if need > self.num_blocks:
            raise RequestError(
                f"the request needs {need} KV cache blocks but the cache holds {self.num_blocks}: "
                f"shorten the prompt or max_tokens, or give the KV cache more memory"
            )


class Processor:
    def __init__(self, tokenizer: Tokenizer | None, limits: PromptLimits, source: str):
        """`source`: the model's path, named in the errors of a model without a tokenizer."""
        self.tokenizer, self.limits, self.source = tokenizer, limits, source
        self.grammars = Grammars(tokenizer, limits.vocab_size)  # compiles a request's constraint to check it

    @property
    def max_model_len(self) -> int:
        return self.limits.max_model_len

    @property
    def vocab_size(self) -> int:
        return self.limits.vocab_size

    def encode_prompt(self, prompt: Prompt) -> list[int]:
        """Token ids of a text (with BOS where the tokenizer adds one), of ids (checked against the vocabulary),
        or of a dict with `prompt` or `prompt_token_ids` (vLLM's form)."""
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                prompt = prompt["prompt_token_ids"]
            elif "prompt" in prompt:
                prompt = prompt["prompt"]
            else:
                raise RequestError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise RequestError(f"{self.source} has no tokenizer: give token ids instead of text")
            ids = self.tokenizer.encode(prompt, add_bos=self.tokenizer.add_bos)
        else:
            ids = list(prompt)
            check_token_ids(ids, self.vocab_size)
        if not ids:
            raise RequestError("the prompt is empty")
        return ids

    def encode_chat(self, messages: list[dict], safe_prompt: bool = False,
                    tools: list[dict] | None = None) -> list[int]:
        """A conversation's prompt ids through the model's chat format, ending where the assistant answers;
        `safe_prompt` prepends the paper's guardrail prompt; `tools` are offered to a model with a tool format
        (server/tool_calls.py), and messages may then carry tool calls and results."""
        if self.tokenizer is None:
            raise RequestError(f"{self.source} has no tokenizer, so it cannot format a chat")
        if not isinstance(messages, list):
            raise RequestError("messages must be a list of {role, content} objects")
        messages = with_safe_prompt(messages, safe_prompt)
        if tools is not None or has_tool_messages(messages):
            if getattr(self.tokenizer, "tools_format", None) is None:
                raise RequestError(f"{self.source}: this model has no tool-calling format (tools and tool "
                                   f"messages need a Mistral tokenizer v3 or later, or a chat template that takes "
                                   f"tools and writes <tool_call> blocks)")
            return self.tokenizer.encode_chat(messages, add_generation_prompt=True, tools=tools)  # type: ignore[call-arg]
        return self.tokenizer.encode_chat(messages, add_generation_prompt=True)

    def fit(self, ids: Sequence[int], params: SamplingParams) -> SamplingParams:
        """Cap max_tokens to the context left (the offline API's rule); a prompt that does not fit at all is an
        error."""
        if params.max_tokens == 0:  # a scored prompt: `check` bounds it
            return params
        room = self.max_model_len - len(ids)
        if room < 1:
            raise RequestError(
                f"the prompt has {len(ids)} tokens, which leaves no room in the context of {self.max_model_len}"
            )
        if params.max_tokens <= room:
            return params
        return dataclasses.replace(params, max_tokens=room)

    def check(self, prompt_ids: Sequence[int], params: SamplingParams) -> None:
        self.limits.check(prompt_ids, params)
        if params.structured is not None:
            self.grammars.check(params.structured)
