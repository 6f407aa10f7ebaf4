"""Structured outputs: constrained decoding by a grammar, through llguidance (no dependencies of its own).

A request may ask for text matching a JSON schema (OpenAI's `response_format` json_schema), any JSON object
(json_object), a regular expression, one of a list of strings, or a Lark / GBNF grammar (vLLM's
`structured_outputs` and `guided_*` fields). Each of its sequences holds a matcher of that grammar. Before a
draw the host fills one packed bitmask row a sequence (32 token ids an int32; llguidance computes it, several
rows in parallel) while the step runs on the device; the sampler sets the logits of every id the grammar does
not allow to -inf, for greedy and sampled rows alike. After the draw the matcher consumes the token. When the
grammar is complete only end-of-sequence is allowed, and the sequence ends there; if max_tokens comes first it
ends with "length", so no incomplete text is ever claimed complete.

Token ids reach llguidance as the bytes generation emits for them (`Tokenizer.vocabulary_bytes`), special
tokens marked with llguidance's 0xFF prefix, so every tokenizer format we load takes part.
"""

from __future__ import annotations

import functools
import json
import threading
from dataclasses import dataclass
from typing import Any

import torch

from mistral7b.errors import RequestError

KINDS = ("json", "json_object", "regex", "choice", "grammar", "lark")
MAX_SPEC_CHARS = 1 << 16  # a schema, regex or grammar of at most 64K characters
MAX_CHOICES = 256
# Whitespace between JSON tokens: at most this much at a time, so a weak model cannot pad an answer with blanks
# until max_tokens (a random one does, with llguidance's unbounded default); enough for pretty-printing. A
# schema's own "x-guidance" options override it.
JSON_OPTIONS = {"whitespace_pattern": r"[\x20\x0A\x0D\x09]{0,40}"}


@dataclass(frozen=True)
class StructuredOutput:
    """What a request's output must match. `spec`: the JSON schema as JSON text (kind "json"), the regex, the
    grammar (kind "grammar": Lark, or llama.cpp's GBNF; "lark": llguidance's Lark only, which names special
    tokens), or the choices (kind "choice", a tuple of strings); "" for json_object."""

    kind: str
    spec: str | tuple[str, ...] = ""

    def validate(self) -> None:
        if self.kind not in KINDS:
            raise RequestError(f"structured output kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.kind == "choice":
            if not isinstance(self.spec, tuple) or not 1 <= len(self.spec) <= MAX_CHOICES or not all(
                    isinstance(c, str) and c for c in self.spec):
                raise RequestError(f"choice: 1 to {MAX_CHOICES} non-empty strings")
            size = sum(len(c) for c in self.spec)
        elif not isinstance(self.spec, str) or (not self.spec and self.kind != "json_object"):
            raise RequestError(f"structured output {self.kind}: a non-empty string is needed")
        else:
            size = len(self.spec)
        if size > MAX_SPEC_CHARS:
            raise RequestError(f"structured output {self.kind}: at most {MAX_SPEC_CHARS} characters, got {size}")

    @classmethod
    def json_schema(cls, schema: Any) -> StructuredOutput:
        """From a schema given as an object (or as JSON text)."""
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except ValueError as e:
                raise RequestError(f"the JSON schema is not valid JSON: {e}") from None
        if not isinstance(schema, (dict, bool)):
            raise RequestError(f"a JSON schema must be an object, got {type(schema).__name__}")
        return cls("json", json.dumps(schema, sort_keys=True))

    def grammar(self) -> str:
        """llguidance's grammar text for this output, or RequestError."""
        import llguidance

        try:
            if self.kind == "json":
                return llguidance.LLMatcher.grammar_from_json_schema(self.spec, defaults=JSON_OPTIONS)
            if self.kind == "json_object":
                return llguidance.LLMatcher.grammar_from_json_schema('{"type": "object"}', defaults=JSON_OPTIONS)
            if self.kind == "regex":
                return llguidance.LLMatcher.grammar_from_regex(self.spec)
            if self.kind == "choice":
                return llguidance.grammar_from("choice", json.dumps(list(self.spec)))
            if self.kind == "lark":  # llguidance's Lark as is (special tokens as <[id]>, %json {schema})
                return llguidance.LLMatcher.grammar_from_lark(self.spec)
            return llguidance.grammar_from("grammar", self.spec)
        except (ValueError, TypeError, RuntimeError) as e:
            raise RequestError(f"the {self.kind} constraint cannot be compiled: {_first_line(e)}") from None


def _first_line(e: BaseException | str) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


class _Vocabulary:
    """What llguidance's TokenizerWrapper reads of a tokenizer: each id's bytes (special ones 0xFF-prefixed),
    BOS / EOS, and a tokenize call whose tokens spell exactly the bytes given (llguidance relies on that)."""

    def __init__(self, tokenizer: Any, vocab_size: int):
        pieces, specials = tokenizer.vocabulary_bytes()
        pieces = list(pieces) + [b""] * max(0, vocab_size - len(pieces))  # ids the model has past the tokenizer's
        self.pieces = pieces[:vocab_size]
        self.tokens = [b"\xff" + p if i in specials else p for i, p in enumerate(self.pieces)]
        self.special_token_ids = sorted(i for i in specials if i < vocab_size)
        self.bos_token_id = tokenizer.bos_id
        self.eos_token_id = tokenizer.eos_id if tokenizer.eos_id is not None else min(tokenizer.eos_ids, default=0)
        self._encode = tokenizer.encode
        self._by_bytes: dict[bytes, int] = {}
        for i, p in enumerate(self.pieces):
            if p and i not in specials:
                self._by_bytes.setdefault(p, i)

    def __call__(self, text: str | bytes) -> list[int]:
        data = text if isinstance(text, bytes) else text.encode("utf-8")
        ids = self._encode(data.decode("utf-8", errors="replace"), add_bos=False)
        spelled = b"".join(self.pieces[i] for i in ids)
        if spelled == data:
            return ids
        if ids and spelled == b" " + data and self.pieces[ids[0]].startswith(b" "):
            # SentencePiece's dummy prefix: the first piece without its space, or its bytes one by one
            rest = self.pieces[ids[0]][1:]
            head = [] if not rest else [self._by_bytes[rest]] if rest in self._by_bytes else self._bytes(rest)
            return head + ids[1:]
        return self._bytes(data)  # anything else (invalid UTF-8 cut mid-character): byte by byte

    def _bytes(self, data: bytes) -> list[int]:
        ids = []
        for b in data:
            one = bytes([b])
            if one not in self._by_bytes:
                raise ValueError(f"no token spells the byte {b:#04x}")
            ids.append(self._by_bytes[one])
        return ids


class Grammars:
    """A tokenizer's grammar engine: compiled constraints (cached), one matcher a sequence, the step's bitmask."""

    def __init__(self, tokenizer: Any, vocab_size: int):
        self.tokenizer, self.vocab_size = tokenizer, vocab_size
        self.words = (vocab_size + 31) // 32
        self._lock = threading.Lock()
        self._lltokenizer: Any = None
        self._executor: Any = None

    def lltokenizer(self) -> Any:
        """llguidance's view of the vocabulary: built once (about a second for 50K tokens), on first use."""
        with self._lock:
            if self._lltokenizer is None:
                import llguidance

                if self.tokenizer is None:
                    raise RequestError("this model has no tokenizer, so its output cannot be constrained")
                eos = sorted(i for i in self.tokenizer.eos_ids if i < self.vocab_size) or None
                if hasattr(self.tokenizer, "tokenizer_json"):  # Hugging Face's format: llguidance reads it
                    source: Any = self.tokenizer.tokenizer_json()
                else:
                    try:
                        source = llguidance.TokenizerWrapper(_Vocabulary(self.tokenizer, self.vocab_size))
                    except NotImplementedError as e:
                        raise RequestError(f"structured outputs are not supported for this tokenizer: {e}") from None
                self._lltokenizer = llguidance.LLTokenizer(source, n_vocab=self.vocab_size, eos_token=eos)
                self._executor = llguidance.LLExecutor()
            return self._lltokenizer

    def warm(self) -> threading.Thread | None:
        """Build llguidance's vocabulary in a background thread (a server, at start), so the first constrained
        request does not wait for it; errors surface on that request instead."""
        if self.tokenizer is None:
            return None

        def build() -> None:
            try:
                self.lltokenizer()
            except (RequestError, ValueError, RuntimeError):
                pass

        thread = threading.Thread(target=build, name="grammar-vocabulary", daemon=True)
        thread.start()
        return thread

    def check(self, output: StructuredOutput) -> None:
        """RequestError (with llguidance's reason) unless the constraint compiles for this vocabulary."""
        self._compiled(output)

    @functools.lru_cache(maxsize=256)  # noqa: B019 (one Grammars an engine, living as long as it)
    def _compiled(self, output: StructuredOutput) -> str:
        import llguidance

        output.validate()
        grammar = output.grammar()
        failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, self.lltokenizer())
        if failed:
            reason = _first_line(messages[0] if messages else "")
            raise RequestError(f"the {output.kind} constraint cannot be compiled: {reason}")
        return grammar

    def matcher(self, output: StructuredOutput) -> Any:
        """A fresh matcher for one sequence."""
        import llguidance

        matcher = llguidance.LLMatcher(self.lltokenizer(), self._compiled(output), log_level=0)
        if matcher.is_error():
            raise RequestError(f"the {output.kind} constraint cannot be used: {_first_line(matcher.get_error())}")
        return matcher

    def consume(self, pairs: list[tuple[Any, int]]) -> None:
        """Each matcher takes its token; several in parallel. A token the grammar refuses leaves its matcher in
        the error state, which ends the sequence (it cannot happen for a token drawn under its mask)."""
        if len(pairs) == 1:
            pairs[0][0].consume_token(pairs[0][1])
        else:
            self.lltokenizer()  # the executor is made with it
            self._executor.consume_token_par(pairs)

    def bitmask(self, matchers: list[Any]) -> torch.Tensor:
        """The allowed ids of each row as a packed bitmask [rows, ceil(vocab / 32)] int32 on the host: bit j of
        word w allows id 32 w + j; rows without a matcher allow everything."""
        mask = torch.full((len(matchers), self.words), -1, dtype=torch.int32)
        live = [(m, i) for i, m in enumerate(matchers) if m is not None]
        if len(live) == 1:
            m, i = live[0]
            row = mask[i]
            m.unsafe_compute_mask_ptr(row.data_ptr(), self.words * 4)
        elif live:
            self._executor.unsafe_compute_mask_ptr(live, mask.data_ptr(), self.words * 4, len(matchers))
        return mask


def unpack_bitmask(mask: torch.Tensor, vocab: int) -> torch.Tensor:
    """Packed rows [B, words] int32 -> allowed [B, vocab] bool (on the mask's device)."""
    bits = torch.arange(32, dtype=torch.int32, device=mask.device)
    return ((mask[:, :, None] >> bits) & 1).view(mask.shape[0], -1)[:, :vocab].bool()
