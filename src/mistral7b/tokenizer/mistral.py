"""Mistral's own tokenizer files (tokenizer.model.v1/v2/v3/v7, tekken.json) through mistral-common.

mistral-common is the reference for the instruct format: it encodes each text segment separately, merges the
system prompt(s) into the first user turn for v1, and never parses control tokens out of message text. So chats
go through `encode_chat_completion` unchanged and plain text through its raw tokenizer.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from mistral7b.errors import CheckpointError, RequestError
from mistral7b.tokenizer.base import (Tokenizer, check_messages, check_tool_messages, continues_answer,
                                     has_tool_messages, sentencepiece_bytes)


class MistralCommonTokenizer(Tokenizer):
    def __init__(self, path: str):
        from mistral_common.exceptions import MistralCommonException
        from mistral_common.protocol.instruct.validator import ValidationMode
        from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

        # A plain SentencePiece `tokenizer.model` has no version suffix; mistral-common reads it as v1.
        try:
            # `agnostic` checks message order but leaves the last role to us (check_messages), so a conversation
            # ending with an assistant turn can be encoded when no generation prompt is wanted.
            self._mt = MistralTokenizer.from_file(path, mode=ValidationMode.agnostic)
        except (MistralCommonException, OSError, ValueError, RuntimeError, AssertionError, KeyError) as e:
            raise CheckpointError(f"{path}: not a readable Mistral tokenizer file ({e})") from None
        self.path = path
        self._raw = self._mt.instruct_tokenizer.tokenizer
        self.vocab_size = int(self._raw.n_words)
        self.bos_id = int(self._raw.bos_id)
        self.eos_id = int(self._raw.eos_id)
        self.eos_ids = frozenset({self.eos_id})
        self.tool_calls_id = self._special("[TOOL_CALLS]")  # v3 and later: the model calls tools with it
        self.tools_format = "mistral" if self.tool_calls_id is not None else None
        self._errors: tuple[type[Exception], ...] = (MistralCommonException, ValueError, AssertionError)

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise RequestError(f"text to encode must be a string, got {type(text).__name__}")
        return list(self._raw.encode(text, bos=add_bos, eos=False))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        if skip_special_tokens:
            return self._raw.decode(list(ids))  # special_token_policy defaults to IGNORE: control tokens skipped
        from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy

        return self._raw.decode(list(ids), special_token_policy=SpecialTokenPolicy.KEEP)

    def id_to_piece(self, id: int) -> str:
        return self._raw.id_to_piece(id)

    def vocabulary_bytes(self) -> tuple[list[bytes], set[int]]:
        raw, n = self._raw, self.vocab_size
        if hasattr(raw, "id_to_byte_piece"):  # tekken: special tokens first, then byte-level ranks
            from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy

            specials = set(range(raw.num_special_tokens))
            return [raw.id_to_byte_piece(i, SpecialTokenPolicy.KEEP) for i in range(n)], specials
        sp = raw._model  # SentencePiece (v1, v2, v3): its processor
        pieces = [sentencepiece_bytes(sp.id_to_piece(i), sp.is_byte(i)) for i in range(n)]
        return pieces, {i for i in range(n) if sp.is_control(i) or sp.is_unknown(i)}

    def _special(self, name: str) -> int | None:
        try:
            token = int(self._raw.get_special_token(name))
        except Exception:  # mistral-common raises its own errors (and others, by version) for an unknown token
            return None
        return token if self._raw.id_to_piece(token) == name else None  # v1 answers <unk>

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True,
                    tools: list[dict[str, Any]] | None = None) -> list[int]:
        """`tools`: OpenAI's function tools, offered in the prompt as mistral-common writes them (v3 and later);
        messages may then hold tool calls and results too."""
        from mistral_common.protocol.instruct.request import ChatCompletionRequest

        if tools is not None or has_tool_messages(messages):
            if self.tool_calls_id is None:
                raise RequestError(f"{os.path.basename(self.path)} has no tool-calling format (Mistral "
                                   f"tokenizers v3 and later have one)")
            try:
                request = ChatCompletionRequest(messages=check_tool_messages(messages), tools=tools)
                return list(self._mt.encode_chat_completion(request).tokens)
            except self._errors as e:
                message = str(e).splitlines()[0] if str(e) else type(e).__name__
                raise RequestError(f"messages or tools rejected by the Mistral chat format: {message}") from None
            except Exception as e:  # pydantic's ValidationError of a malformed tool or message
                raise RequestError(f"messages or tools rejected by the Mistral chat format: "
                                   f"{str(e).splitlines()[0]}") from None
        checked = check_messages(messages, add_generation_prompt)
        if continues_answer(checked, add_generation_prompt):
            checked[-1] = {**checked[-1], "prefix": True}  # mistral-common's prefill: the answer stays open
        try:
            request = ChatCompletionRequest(messages=checked)
            return list(self._mt.encode_chat_completion(request).tokens)
        except self._errors as e:
            message = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise RequestError(f"messages rejected by the Mistral chat format: {message}") from None

