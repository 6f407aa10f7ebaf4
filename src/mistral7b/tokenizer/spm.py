"""A SentencePiece tokenizer (as rebuilt from GGUF metadata) with a chat format.

SentencePiece never matches control tokens (`<s>`, `</s>`, `[INST]` in v3) in input text, so `encode` is safe
as is. Chats use the model's Jinja template when it has one: the rendered text is cut at control-token strings
outside message contents and each piece between is encoded on its own, as llama.cpp does (a space prefix after
each special token). Without a template, the Mistral v1 `[INST]` format is built segment by segment, exactly
as mistral-common builds it (system prompts merged into the first user turn, same-role neighbours merged).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import sentencepiece as spm

from mistral7b.errors import RequestError
from mistral7b.tokenizer.base import Tokenizer, continues_answer, sentencepiece_bytes
from mistral7b.tokenizer.chat_template import ChatTemplate, checked_chat, split_at_specials, template_tools_format


class SentencePieceTokenizer(Tokenizer):
    def __init__(
        self,
        sp: spm.SentencePieceProcessor,
        *,
        bos_id: int | None,
        eos_id: int | None,
        eos_ids: Iterable[int],
        add_bos: bool,
        specials: dict[str, int],
        chat_template: ChatTemplate | None,
        origin: str,
    ):
        self.sp = sp
        self.vocab_size = sp.get_piece_size()
        self.bos_id = bos_id
        self.add_bos = add_bos and bos_id is not None
        self.eos_id = eos_id
        self.eos_ids = frozenset(eos_ids) | ({eos_id} if eos_id is not None else set())
        self.specials = specials
        self.chat_template = chat_template
        self.origin = origin

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise RequestError(f"text to encode must be a string, got {type(text).__name__}")
        ids = self.sp.encode(text)
        return [self.bos_id, *ids] if add_bos and self.bos_id is not None else ids  # type: ignore[list-item]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        if skip_special_tokens:
            return self.sp.decode(list(ids))  # control tokens decode to nothing
        out, run = [], []  # control tokens as their pieces, the runs between them decoded as usual
        for i in ids:
            if self.sp.is_control(i):
                out += [self.sp.decode(run), self.sp.id_to_piece(i)]
                run = []
            else:
                run.append(i)
        return "".join(out + [self.sp.decode(run)])

    def id_to_piece(self, id: int) -> str:
        return self.sp.id_to_piece(id)

    def vocabulary_bytes(self) -> tuple[list[bytes], set[int]]:
        sp = self.sp
        pieces = [sentencepiece_bytes(sp.id_to_piece(i), sp.is_byte(i)) for i in range(self.vocab_size)]
        return pieces, {i for i in range(self.vocab_size) if sp.is_control(i) or sp.is_unknown(i)}

    def _piece(self, id: int | None) -> str:
        return self.sp.id_to_piece(id) if id is not None else ""

    @property
    def tools_format(self) -> str | None:
        return template_tools_format(self.chat_template)

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True,
                    tools: list[dict[str, Any]] | None = None) -> list[int]:
        """`tools`: offered through the template's `tools` (a template that takes them: `tools_format`)."""
        checked, variables = checked_chat(messages, add_generation_prompt, tools, self.chat_template, self.origin)
        prefill = continues_answer(checked, add_generation_prompt)
        if self.chat_template is None:
            return self._encode_mistral_v1(checked, prefill)
        rendered = self.chat_template.render(checked, add_generation_prompt and not prefill,
                                             bos_token=self._piece(self.bos_id), eos_token=self._piece(self.eos_id),
                                             **variables)
        if prefill:
            rendered = rendered.continued()
        ids: list[int] = []
        for piece in split_at_specials(rendered.text, rendered.content_spans, self.specials):
            ids.extend([piece] if isinstance(piece, int) else self.sp.encode(piece))
        if self.add_bos and ids[:1] != [self.bos_id]:
            ids.insert(0, self.bos_id)  # type: ignore[arg-type]
        return ids

    def _encode_mistral_v1(self, messages: list[dict[str, str]], prefill: bool = False) -> list[int]:
        """`<s>[INST] user [/INST] answer</s>[INST] ...`, each segment encoded separately (mistral-common v1);
        `prefill`: the last answer stays open (no </s>)."""
        system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
        turns: list[dict[str, str]] = []
        previous = None
        for m in messages:
            if m["role"] != "system":
                if previous == m["role"]:
                    turns[-1]["content"] += "\n\n" + m["content"]
                else:
                    turns.append(dict(m))
            previous = m["role"]
        if not turns or turns[0]["role"] == "assistant":  # system messages only, or an answer first
            turns.insert(0, {"role": "user", "content": ""})
        if system:
            turns[0]["content"] = system + "\n\n" + turns[0]["content"]
        ids = [self.bos_id] if self.bos_id is not None else []
        for i, t in enumerate(turns):
            if t["role"] == "user":
                ids += self.sp.encode(f"[INST] {t['content']} [/INST]")
            else:
                ids += self.sp.encode(t["content"])
                if self.eos_id is not None and not (prefill and i == len(turns) - 1):
                    ids.append(self.eos_id)
        return ids
