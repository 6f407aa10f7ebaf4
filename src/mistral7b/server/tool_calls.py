"""Tool calling: OpenAI's `tools`, `tool_choice` and `parallel_tool_calls` in, `message.tool_calls` and
finish_reason "tool_calls" out, in the model's own call format (`Tokenizer.tools_format`):
- "mistral" (Mistral tokenizers v3 and later, through mistral-common): tools in the prompt as mistral-common
  writes them (`[AVAILABLE_TOOLS]`); a call is the [TOOL_CALLS] token and a JSON list of {"name", "arguments"};
- "hermes" (chat templates that take `tools` and write `<tool_call>`: Hermes, Qwen, SmolLM3 and others): tools
  in the prompt as the template writes them; a call is `<tool_call>\n{"name", "arguments"}\n</tool_call>`, one
  block a call.
By tool_choice:
- "auto": the answer is generated freely; it is a call only if it starts as the format starts a call and the
  whole parses, names known tools and has object arguments (text that merely looks like a call stays text);
- "required" / a named function: the answer is constrained by a grammar (engine/structured_output.py): the
  format's calls, whose arguments follow each function's JSON schema, written as the training data writes them,
  so even a weak model answers with a valid call (one call unless parallel_tool_calls);
- "none": no tools are offered (and Mistral's [TOOL_CALLS] token is banned).
Call ids are 9 letters and digits, as Mistral's format requires.
"""

from __future__ import annotations

import json
import re
import secrets
import string
from dataclasses import dataclass
from typing import Any

from mistral7b.engine.structured_output import StructuredOutput
from mistral7b.errors import RequestError

ID_ALPHABET = string.ascii_letters + string.digits
TOOL_CALLS = "[TOOL_CALLS]"
# Forced calls are written as mistral-common writes them in training data: `{"name": "f", "arguments": {...}}`,
# no other whitespace (a model cannot pad a call with blanks until max_tokens).
CALL_JSON = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
HERMES_OPEN = "<tool_call>"
HERMES_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


def new_call_id() -> str:
    return "".join(secrets.choice(ID_ALPHABET) for _ in range(9))


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text of an object

    def message(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def _call_schema(functions: dict[str, dict[str, Any]], names: list[str]) -> dict[str, Any]:
    """One call {"name", "arguments"} of one of `names`, its arguments by the function's schema."""
    variants = [{"type": "object", "properties": {
        "name": {"const": name}, "arguments": functions[name].get("parameters") or {"type": "object"}},
        "required": ["name", "arguments"], "additionalProperties": False} for name in names]
    return variants[0] if len(variants) == 1 else {"anyOf": variants}


def _read_call(call: Any, functions: dict[str, dict[str, Any]]) -> ToolCall | None:
    if not isinstance(call, dict) or call.get("name") not in functions:
        return None
    arguments = call.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return ToolCall(new_call_id(), call["name"], json.dumps(arguments, ensure_ascii=False))


@dataclass
class Tools:
    """A request's tools as the model sees them and as its answers are read."""

    functions: dict[str, dict[str, Any]]  # name -> the OpenAI function object (name, description, parameters)
    choice: str  # "auto", "required", "none", or a function's name
    parallel: bool
    format: str  # "mistral" or "hermes"
    token: int | None = None  # mistral: the [TOOL_CALLS] token's id

    @classmethod
    def from_request(cls, tools: list[dict[str, Any]] | None, tool_choice: Any, parallel: bool,
                     tokenizer: Any) -> Tools | None:
        """None when the request has no tools (or tool_choice "none" with none); RequestError for a model
        without a tool format, an unknown function in tool_choice, or duplicate names."""
        if not tools:
            if tool_choice not in (None, "none", "auto"):
                raise RequestError("tool_choice names a tool but the request has no tools")
            return None
        format = getattr(tokenizer, "tools_format", None)
        if format is None:
            raise RequestError("this model has no tool-calling format (tools need a Mistral tokenizer v3 or "
                               "later, or a chat template that takes tools and writes <tool_call> blocks)")
        functions: dict[str, dict[str, Any]] = {}
        for tool in tools:
            fn = tool["function"]
            if fn["name"] in functions:
                raise RequestError(f"tools: the function name {fn['name']!r} appears twice")
            functions[fn["name"]] = fn
        if isinstance(tool_choice, dict):
            choice = tool_choice["function"]["name"]
            if choice not in functions:
                raise RequestError(f"tool_choice names the function {choice!r}, which is not among the tools "
                                   f"({', '.join(functions)})")
        else:
            choice = tool_choice or "auto"
        return cls(functions, choice, parallel, format, getattr(tokenizer, "tool_calls_id", None))

    @property
    def offered(self) -> list[dict[str, Any]] | None:
        """The tools for the prompt (none with tool_choice "none")."""
        if self.choice == "none":
            return None
        return [{"type": "function", "function": fn} for fn in self.functions.values()]

    def logit_bias(self) -> dict[int, float]:
        return {self.token: -100.0} if self.choice == "none" and self.token is not None else {}

    def constraint(self) -> StructuredOutput | None:
        """The grammar of a forced call (mistral: the [TOOL_CALLS] token, an optional space as SentencePiece
        writes one, a JSON list of calls; hermes: <tool_call> blocks, one a call)."""
        if self.choice in ("auto", "none"):
            return None
        names = list(self.functions) if self.choice == "required" else [self.choice]
        many = self.parallel and self.choice == "required"
        call = {**_call_schema(self.functions, names), "x-guidance": CALL_JSON}
        if self.format == "hermes":
            block = 'call: "<tool_call>\\n" %json ' + json.dumps(call) + ' "\\n</tool_call>"'
            repeat = ' ("\\n" call)*' if many else ""
            return StructuredOutput("lark", f"start: call{repeat}\n{block}")
        schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": _call_schema(self.functions, names),
                                  "x-guidance": CALL_JSON}
        if not many:
            schema["maxItems"] = 1
        return StructuredOutput("lark", f'start: <[{self.token}]> " "? calls\ncalls: %json {json.dumps(schema)}')

    def starts(self, output_ids: list[int], text: str) -> bool | None:
        """Whether an answer so far is a call (None: too early to tell; its text is held meanwhile)."""
        if self.choice == "none":
            return False
        if self.format == "mistral":
            return output_ids[0] == self.token if output_ids else None
        head = text.lstrip()
        if head.startswith(HERMES_OPEN):
            return True
        return None if HERMES_OPEN.startswith(head) else False

    def parse(self, output_ids: list[int], text: str) -> list[ToolCall] | None:
        """The calls an answer makes, or None where it is text: it must start as the format starts a call, and
        the whole must be calls to known functions with object arguments."""
        if not output_ids or not self.starts(output_ids, text):
            return None
        if self.format == "hermes":
            blocks = HERMES_BLOCK.findall(text)
            if not blocks or HERMES_BLOCK.sub("", text).strip():
                return None  # anything besides the blocks: text
            raw = []
            for block in blocks:
                try:
                    raw.append(json.loads(block))
                except ValueError:
                    return None
        else:
            try:
                raw = json.loads(text)
            except ValueError:
                return None
            if isinstance(raw, dict):
                raw = [raw]
            if not isinstance(raw, list) or not raw:
                return None
        calls = [_read_call(call, self.functions) for call in raw]
        return None if any(c is None for c in calls) else calls  # type: ignore[return-value]
