"""Tokenizers built on the `tokenizers` library: Hugging Face folders (tokenizer.json) and GGUF byte-level BPE.

transformers is not needed at run time: tokenizer.json is read by `tokenizers`, and the few settings that live
in tokenizer_config.json (chat template, bos/eos, add_bos_token) are read as JSON.

Special tokens never come from user text. `encode` uses a twin of the tokenizer with `encode_special_tokens`
on (special added tokens are matched as plain text). A chat is encoded in one piece, as Hugging Face does, so
merges across template/content boundaries come out the same; if a special token turns up inside a message
content, the text is instead cut at the template's own special tokens and the rest encoded as plain text.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any

import tokenizers

from mistral7b.config import read_json
from mistral7b.errors import CheckpointError, RequestError
from mistral7b.tokenizer.base import Tokenizer, continues_answer
from mistral7b.tokenizer.chat_template import ChatTemplate, checked_chat, split_at_specials, template_tools_format

# Control tokens that end a turn in common chat formats (llama.cpp treats the same set as end-of-generation).
END_OF_TURN_TOKENS = frozenset({
    "</s>", "<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
    "<|end_of_text|>", "<EOT>", "<|END_OF_TURN_TOKEN|>",
})


class TokenizersTokenizer(Tokenizer):
    def __init__(
        self,
        tok: tokenizers.Tokenizer,
        *,
        bos_token: str | None,
        eos_tokens: Iterable[str],
        add_bos: bool,
        chat_template: ChatTemplate | None,
        origin: str,
        extra_eos_ids: Iterable[int] = (),
    ):
        self._tok = tok
        self._plain = tokenizers.Tokenizer.from_str(tok.to_str())
        self._plain.encode_special_tokens = True
        self.origin = origin
        self.chat_template = chat_template
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        self.specials: dict[str, int] = {
            t.content: i for i, t in tok.get_added_tokens_decoder().items() if t.special
        }
        self.bos_token = bos_token
        self.bos_id = tok.token_to_id(bos_token) if bos_token else None
        self.add_bos = add_bos and self.bos_id is not None
        self.eos_token = next(iter(eos_tokens), None)
        self.eos_id = tok.token_to_id(self.eos_token) if self.eos_token else None
        ends = set(eos_tokens) | (END_OF_TURN_TOKENS & self.specials.keys())
        self.eos_ids = frozenset({i for t in ends if (i := tok.token_to_id(t)) is not None} | set(extra_eos_ids))

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise RequestError(f"text to encode must be a string, got {type(text).__name__}")
        ids = self._plain.encode(text, add_special_tokens=False).ids
        return [self.bos_id, *ids] if add_bos and self.bos_id is not None else ids  # type: ignore[list-item]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_piece(self, id: int) -> str:
        return self._tok.id_to_token(id) or ""

    def tokenizer_json(self) -> str:
        """The tokenizer.json this tokenizer runs (llguidance reads its vocabulary from it directly)."""
        return self._tok.to_str()

    @property
    def tools_format(self) -> str | None:
        return template_tools_format(self.chat_template)

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True,
                    tools: list[dict[str, Any]] | None = None) -> list[int]:
        """`tools`: offered through the template's `tools` (a template that takes them: `tools_format`)."""
        checked, variables = checked_chat(messages, add_generation_prompt, tools, self.chat_template, self.origin)
        if self.chat_template is None:
            raise RequestError(f"{self.origin} has no chat template, so it cannot format a chat; send plain text")
        prefill = continues_answer(checked, add_generation_prompt)
        rendered = self.chat_template.render(checked, add_generation_prompt and not prefill,
                                             bos_token=self.bos_token or "", eos_token=self.eos_token or "",
                                             **variables)
        if prefill:
            rendered = rendered.continued()
        ids = self._encode_rendered(rendered.text, rendered.content_spans)
        # BOS only where the template did not already write it (no double BOS).
        if self.add_bos and not (self.bos_token and rendered.text.startswith(self.bos_token)):
            ids = [self.bos_id, *ids]  # type: ignore[list-item]
        return ids

    def _encode_rendered(self, text: str, spans: Sequence[tuple[int, int]]) -> list[int]:
        enc = self._tok.encode(text, add_special_tokens=False)
        special_ids = set(self.specials.values())
        smuggled = any(
            i in special_ids and any(s < b and a < e for a, b in spans)
            for i, (s, e) in zip(enc.ids, enc.offsets)
        )
        if not smuggled:
            return list(enc.ids)
        ids: list[int] = []
        for piece in split_at_specials(text, spans, self.specials):
            ids.extend([piece] if isinstance(piece, int) else self._plain.encode(piece, add_special_tokens=False).ids)
        return ids


def _token_text(value: Any) -> str | None:
    """tokenizer_config.json writes a token as a string or as {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _template_source(folder: str, config: dict[str, Any], name: str = "default") -> str | None:
    """The folder's chat template, or its named variant ("tool_use") where tokenizer_config.json lists them."""
    jinja_file = os.path.join(folder, "chat_template.jinja")
    if name == "default" and os.path.isfile(jinja_file):
        with open(jinja_file, encoding="utf-8") as f:
            return f.read()
    source = config.get("chat_template")
    if isinstance(source, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
        source = named.get(name)
    elif name != "default":
        return None
    return source if isinstance(source, str) else None


def load_hf_folder(folder: str) -> TokenizersTokenizer:
    """tokenizer.json (+ tokenizer_config.json, chat_template.jinja, generation_config.json) of a HF folder."""
    path = os.path.join(folder, "tokenizer.json")
    try:
        tok = tokenizers.Tokenizer.from_file(path)
    except Exception as e:  # tokenizers raises a bare Exception for bad JSON or an unknown model
        raise CheckpointError(f"{path}: not a readable tokenizer.json ({str(e).splitlines()[0]})") from None
    config_path = os.path.join(folder, "tokenizer_config.json")
    config = read_json(config_path) if os.path.isfile(config_path) else {}
    bos = _token_text(config.get("bos_token"))
    eos = _token_text(config.get("eos_token"))
    add_bos = config.get("add_bos_token")
    if add_bos is None and bos is not None:  # not written down: ask the post-processor whether it adds BOS
        add_bos = tok.encode("a", add_special_tokens=True).ids[:1] == [tok.token_to_id(bos)]
    extra_eos: list[int] = []
    gen_path = os.path.join(folder, "generation_config.json")
    if os.path.isfile(gen_path):
        value = read_json(gen_path).get("eos_token_id")
        extra_eos = [value] if isinstance(value, int) else [v for v in value or [] if isinstance(v, int)]
    source = _template_source(folder, config)
    template = (ChatTemplate(source, f"{folder}: chat template", tool_use=_template_source(folder, config, "tool_use"))
                if source else None)
    return TokenizersTokenizer(tok, bos_token=bos, eos_tokens=[eos] if eos else [], add_bos=bool(add_bos),
                               chat_template=template, origin=folder, extra_eos_ids=extra_eos)
