"""Jinja chat templates (Hugging Face `chat_template`, GGUF `tokenizer.chat_template`), rendered safely.

Two dangers, two defences:
- The template is code from a model file. It runs in Jinja's immutable sandbox; reaching for an unsafe
  attribute (`''.__class__`) is an error, not a silent empty string; loops, calls and attribute reads are
  counted against a step and time budget, so a template that errors or loops becomes a RequestError.
- Message content is user text, and a special token must never come from it. The template is rendered twice,
  once with the real contents and once with each content replaced by a unique sentinel; lining the two up
  gives the exact span of every content in the real text (a template may `trim` content; any other change is
  an error). Tokenizers then parse special tokens only outside those spans.
"""

from __future__ import annotations

import contextvars
import json
import re
import secrets
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

from mistral7b.errors import RequestError
from mistral7b.tokenizer.base import check_messages, check_tool_messages, has_tool_messages

MAX_STEPS = 2_000_000  # loop iterations + calls + attribute reads in one render
MAX_SECONDS = 5.0
MAX_OUTPUT_CHARS = 16_000_000
MAX_RANGE = 100_000


class TemplateBudgetError(Exception):
    pass


class _Budget:
    def __init__(self) -> None:
        self.steps = 0
        self.deadline = time.monotonic() + MAX_SECONDS

    def tick(self) -> None:
        self.steps += 1
        if self.steps > MAX_STEPS:
            raise TemplateBudgetError(f"more than {MAX_STEPS} steps")
        if self.steps % 1024 == 0 and time.monotonic() > self.deadline:
            raise TemplateBudgetError(f"more than {MAX_SECONDS:g} s")


_budget: contextvars.ContextVar[_Budget] = contextvars.ContextVar("chat_template_budget")


def _tick() -> None:
    budget = _budget.get(None)
    if budget is not None:
        budget.tick()


class _CountedRange(Sequence):
    """`range` whose iteration counts against the render budget (nested loops cannot run away)."""

    def __init__(self, *args: int):
        self._r = range(*args)
        if len(self._r) > MAX_RANGE:
            raise TemplateBudgetError(f"range of more than {MAX_RANGE} items")

    def __len__(self) -> int:
        return len(self._r)

    def __getitem__(self, i):  # type: ignore[override]
        return self._r[i]

    def __iter__(self) -> Iterator[int]:
        for x in self._r:
            _tick()
            yield x


class _GenerationTag(Extension):
    """`{% generation %}...{% endgeneration %}` (HF's assistant-mask marker): renders its body unchanged."""

    tags = {"generation"}

    def parse(self, parser: Any) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.Scope(body, lineno=lineno)


class _Environment(ImmutableSandboxedEnvironment):
    """HF's sandbox plus: unsafe attributes raise, and calls/reads/big repeats are bounded."""

    intercepted_binops = frozenset({"*", "**"})

    def unsafe_undefined(self, obj: Any, attribute: str) -> jinja2.Undefined:
        raise SecurityError(f"access to attribute {attribute!r} of a {type(obj).__name__} is not allowed")

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        _tick()
        return super().call(__context, __obj, *args, **kwargs)

    def getattr(self, obj: Any, attribute: str) -> Any:
        _tick()
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        _tick()
        return super().getitem(obj, argument)

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "**" and isinstance(right, int) and abs(right) > 64:
            raise TemplateBudgetError("exponent too large")
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > MAX_OUTPUT_CHARS:
                    raise TemplateBudgetError("repeated sequence too long")
        return super().call_binop(context, operator, left, right)


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _make_environment() -> _Environment:
    env = _Environment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols", _GenerationTag])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, range=_CountedRange)
    return env


@dataclass(frozen=True)
class RenderedChat:
    text: str
    content_spans: list[tuple[int, int]]  # [start, end) of each message content inside `text`, in text order

    def continued(self) -> RenderedChat:
        """The chat cut right after its last content, the answer being continued (rendered without a generation
        prompt): what follows it (the end of the turn) is dropped, as transformers' continue_final_message
        drops it."""
        if not self.content_spans:
            return self
        end = self.content_spans[-1][1]
        return RenderedChat(self.text[:end], [span for span in self.content_spans if span[1] <= end])


class ChatTemplate:
    def __init__(self, source: str, origin: str = "chat template", tool_use: str | None = None):
        """`tool_use`: the model's separate template for chats with tools (Hugging Face's named "tool_use"
        template, GGUF's tokenizer.chat_template.tool_use), rendered instead when tools are given."""
        self.source = source
        self.origin = origin
        self.tool_use = ChatTemplate(tool_use, f"{origin} (tool_use)") if tool_use else None
        self._error: str | None = None
        try:
            self._template: jinja2.Template | None = _make_environment().from_string(source)
        except jinja2.TemplateError as e:  # reported when a chat is asked for: plain text still works
            self._template, self._error = None, f"{origin} does not compile: {e}"

    def render_text(self, messages: list[dict], add_generation_prompt: bool, **variables: Any) -> str:
        """The rendered text only, exactly as Hugging Face's apply_chat_template(tokenize=False) would give it."""
        if self._template is None:
            raise RequestError(self._error or f"{self.origin} does not compile")
        token = _budget.set(_Budget())
        try:
            out: list[str] = []
            size = 0
            for chunk in self._template.generate(messages=messages, add_generation_prompt=add_generation_prompt,
                                                 **variables):
                size += len(chunk)
                if size > MAX_OUTPUT_CHARS:
                    raise TemplateBudgetError(f"output longer than {MAX_OUTPUT_CHARS} characters")
                out.append(chunk)
            return "".join(out)
        except SecurityError as e:
            raise RequestError(f"{self.origin} tried something unsafe: {e}") from None
        except TemplateBudgetError as e:
            raise RequestError(f"{self.origin} ran away ({e}) and was stopped") from None
        except jinja2.TemplateError as e:
            raise RequestError(f"{self.origin} rejected the messages: {e}") from None
        except RecursionError:
            raise RequestError(f"{self.origin} recursed too deeply") from None
        except Exception as e:  # a template is arbitrary code: any failure is a bad request, not a crash
            raise RequestError(f"{self.origin} failed: {type(e).__name__}: {e}") from None
        finally:
            _budget.reset(token)

    def render(self, messages: list[dict], add_generation_prompt: bool, **variables: Any) -> RenderedChat:
        """The rendered text and where each message content sits in it (RequestError if the template alters it)."""
        if variables.get("tools") is not None and self.tool_use is not None:
            return self.tool_use.render(messages, add_generation_prompt, **variables)
        real = self.render_text(messages, add_generation_prompt, **variables)
        nonce = secrets.token_hex(8)
        texts = [i for i, m in enumerate(messages) if isinstance(m.get("content"), str)]  # not a call's None
        masked = [dict(m, content=f"\ue000{nonce}:{i}\ue001") if i in texts else m for i, m in enumerate(messages)]
        pieces = re.split(f"\ue000{nonce}:(\\d+)\ue001", self.render_text(masked, add_generation_prompt, **variables))
        seen = {int(i) for i in pieces[1::2]}
        for i in texts:
            if i not in seen:
                raise RequestError(f"{self.origin} does not show messages[{i}].content as given "
                                   f"(it drops or changes it), so its tokens cannot be kept apart from the template's")
        unaligned = RequestError(f"{self.origin} changes message content (beyond trimming whitespace), "
                                 "so its tokens cannot be kept apart from the template's")
        if not real.startswith(pieces[0]):
            raise unaligned
        pos, spans = len(pieces[0]), []
        for k in range(1, len(pieces), 2):
            content, after = messages[int(pieces[k])]["content"], pieces[k + 1]
            for shown in (content, content.strip(), content.lstrip(), content.rstrip()):
                if real.startswith(shown, pos) and real.startswith(after, pos + len(shown)):
                    break
            else:
                raise unaligned
            spans.append((pos, pos + len(shown)))
            pos += len(shown) + len(after)
        if pos != len(real):
            raise unaligned
        return RenderedChat(real, spans)


def template_tools_format(template: ChatTemplate | None) -> str | None:
    """The call format of a template that takes `tools`: "hermes" where it writes <tool_call> blocks (Hermes,
    Qwen, SmolLM3 and others), else None (no tool calling through it)."""
    if template is not None and template.tool_use is not None:
        template = template.tool_use
    if template is None or "tools" not in template.source:
        return None
    return "hermes" if "<tool_call>" in template.source else None


def checked_chat(messages: Any, add_generation_prompt: bool, tools: list[dict[str, Any]] | None,
                 template: ChatTemplate | None, origin: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """A template tokenizer's chat checked (with tool calls and results where tools are in play) and the
    template variables it adds (`tools`); RequestError where tools are given to a template that takes none."""
    if tools is None and not has_tool_messages(messages):
        return check_messages(messages, add_generation_prompt), {}
    if template_tools_format(template) is None:
        raise RequestError(f"{origin}: its chat template takes no tools")
    return check_tool_messages(messages), ({"tools": tools} if tools is not None else {})


def split_at_specials(text: str, content_spans: Sequence[tuple[int, int]],
                      specials: Mapping[str, int]) -> list[str | int]:
    """Cut `text` at special-token strings found OUTSIDE the content spans: plain-text pieces and special ids.

    Longest match wins (`<|im_end|>` before `<|im`). Text inside a content span is never searched.
    """
    if not specials:
        return [text] if text else []
    pattern = re.compile("|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True) if s))
    out: list[str | int] = []
    plain_start = 0
    regions, pos = [], 0
    for start, end in sorted(content_spans):
        regions.append((pos, start))
        pos = end
    regions.append((pos, len(text)))
    for start, end in regions:
        for m in pattern.finditer(text, start, end):
            if m.start() > plain_start:
                out.append(text[plain_start:m.start()])
            out.append(specials[m.group()])
            plain_start = m.end()
    if plain_start < len(text):
        out.append(text[plain_start:])
    return out
