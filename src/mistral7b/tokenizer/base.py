"""The one interface every tokenizer implements, and the message checks all chat formats share.

The engine only needs these five things from a tokenizer (ids for text, text for ids, ids for a chat, which ids
end a turn, the raw piece for debugging), so Mistral's own files, Hugging Face folders and GGUF metadata can all
sit behind it. Two promises hold for every implementation: `encode` never turns text into special or control
tokens (a prompt cannot smuggle `</s>`), and `decode` leaves special tokens out of the text.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

from mistral7b.errors import RequestError

ROLES = ("system", "user", "assistant")


class Tokenizer(ABC):
    vocab_size: int
    bos_id: int | None
    eos_id: int | None = None  # the end-of-sequence token the vocabulary names as such
    eos_ids: frozenset[int]  # every id that ends generation: eos and end-of-turn tokens
    add_bos: bool = True  # the file's add_bos_token: chats follow it; `encode` obeys its caller

    @abstractmethod
    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Ids of plain text; special/control token strings in `text` stay text. No EOS is added.

        `add_bos=True` prepends BOS whenever the vocabulary has one; pass `add_bos=tok.add_bos` to follow the
        file's add_bos_token instead.
        """

    @abstractmethod
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of ids, special/control tokens skipped (or, with skip_special_tokens False, written as their
        vocabulary entries, as the library behind each tokenizer writes them)."""

    @abstractmethod
    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Ids of an OpenAI-shaped conversation in the model's chat format (BOS included where it belongs)."""

    @abstractmethod
    def id_to_piece(self, id: int) -> str:
        """The raw vocabulary entry of one id, for debugging and logprobs."""

    def vocabulary_bytes(self) -> tuple[list[bytes], set[int]]:
        """Each id's bytes as generation emits them (a byte-fallback piece: its one byte) and the ids of special
        or control tokens: what a grammar engine needs to know which ids can continue a text
        (engine/structured_output.py)."""
        raise NotImplementedError(f"{type(self).__name__} does not list its tokens' bytes")


def sentencepiece_bytes(piece: str, byte: bool) -> bytes:
    """A SentencePiece piece's bytes: "▁" is a space, a byte-fallback piece "<0xAB>" is the byte 0xAB."""
    return bytes([int(piece[3:5], 16)]) if byte else piece.replace("\u2581", " ").encode("utf-8")


def check_messages(messages: Any, add_generation_prompt: bool = True) -> list[dict[str, str]]:
    """Messages as a list of {role, content} dicts, or RequestError naming the first problem. A chat may end
    with an assistant message (continues_answer) or hold system messages only (the template decides what it
    makes of them)."""
    if not isinstance(messages, list):
        raise RequestError(f"messages must be a list of {{role, content}} objects, got {type(messages).__name__}")
    if not messages:
        raise RequestError("messages is empty: a chat needs at least one message")
    checked = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise RequestError(f"messages[{i}] must be an object with 'role' and 'content', got {type(m).__name__}")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise RequestError(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {role!r}")
        if not isinstance(content, str):
            raise RequestError(f"messages[{i}].content must be a string, got {type(content).__name__}")
        checked.append({"role": role, "content": content})
    return checked


def has_tool_messages(messages: Any) -> bool:
    return isinstance(messages, list) and any(
        isinstance(m, dict) and (m.get("role") == "tool" or m.get("tool_calls")) for m in messages)


def check_tool_messages(messages: Any) -> list[dict[str, Any]]:
    """A conversation with tool calls and results: {role, content} messages as `check_messages` takes them,
    assistant messages with `tool_calls` ({id, function: {name, arguments}}, content may be empty) and `tool`
    messages ({content, tool_call_id}); RequestError naming the first problem."""
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list of message objects")
    checked: list[dict[str, Any]] = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise RequestError(f"messages[{i}] must be an object, got {type(m).__name__}")
        role, content = m.get("role"), m.get("content")
        if role == "tool":
            if not isinstance(content, str) or not isinstance(m.get("tool_call_id"), str):
                raise RequestError(f"messages[{i}]: a tool message needs string content and tool_call_id")
            checked.append({"role": "tool", "content": content, "tool_call_id": m["tool_call_id"],
                            **({"name": m["name"]} if m.get("name") else {})})
        elif role == "assistant" and m.get("tool_calls"):
            calls = []
            for call in m["tool_calls"]:
                fn = call.get("function") if isinstance(call, dict) else None
                if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not isinstance(
                        fn.get("arguments"), str) or not isinstance(call.get("id"), str):
                    raise RequestError(f"messages[{i}].tool_calls: each needs an id and a function name and "
                                       f"arguments (strings)")
                calls.append({"id": call["id"], "function": {"name": fn["name"], "arguments": fn["arguments"]}})
            checked.append({"role": "assistant", "content": content or None, "tool_calls": calls})
        else:
            checked.extend(check_messages([m], add_generation_prompt=False))
    return checked


def continues_answer(messages: list[dict[str, str]], add_generation_prompt: bool) -> bool:
    """A chat for generation that ends with an assistant message: the model continues that answer (a prefill, as
    llama.cpp does and Mistral's API does with `prefix: true`) instead of starting a new one, so the answer is
    left open: no end-of-turn after it and no generation prompt."""
    return add_generation_prompt and messages[-1]["role"] == "assistant"
