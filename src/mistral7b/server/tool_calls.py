"""Tool calling for Mistral models (tokenizers v3 and later, through mistral-common): OpenAI's `tools`,
`tool_choice` and `parallel_tool_calls` in, `message.tool_calls` and finish_reason "tool_calls" out.

The tools go into the prompt as mistral-common writes them (`[AVAILABLE_TOOLS]`); a model calls them by
answering `[TOOL_CALLS]` and a JSON list of {"name", "arguments"}. By tool_choice:
- "auto": the answer is generated freely; it is a call only if it starts with the [TOOL_CALLS] token and the
  list parses, names known tools and has object arguments (text that merely looks like a call stays text);
- "required" / a named function: the answer is constrained by a grammar (engine/structured_output.py): the
  [TOOL_CALLS] token, then a list of calls whose arguments follow each function's JSON schema, so even a weak
  model answers with a valid call (one call unless parallel_tool_calls);
- "none": the [TOOL_CALLS] token is banned and no tools are offered.
Call ids are 9 letters and digits, as Mistral's format requires.
"""

from __future__ import annotations

import json
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


def new_call_id() -> str:
    return "".join(secrets.choice(ID_ALPHABET) for _ in range(9))


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text of an object

    def message(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class Tools:
    """A request's tools as the model sees them and as its answers are read."""

    functions: dict[str, dict[str, Any]]  # name -> the OpenAI function object (name, description, parameters)
    choice: str  # "auto", "required", "none", or a function's name
    parallel: bool
    token: int  # the [TOOL_CALLS] token's id

    @classmethod
    def from_request(cls, tools: list[dict[str, Any]] | None, tool_choice: Any, parallel: bool,
                     tokenizer: Any) -> Tools | None:
        """None when the request has no tools (or tool_choice "none" with none); RequestError for a model
        without a tool format, an unknown function in tool_choice, or duplicate names."""
        if not tools:
            if tool_choice not in (None, "none", "auto"):
                raise RequestError("tool_choice names a tool but the request has no tools")
            return None
        token = getattr(tokenizer, "tool_calls_id", None)
        if token is None:
            raise RequestError("this model has no tool-calling format (tools need a Mistral tokenizer v3 or "
                               "later, with the [TOOL_CALLS] token)")
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
        return cls(functions, choice, parallel, token)

    @property
    def offered(self) -> list[dict[str, Any]] | None:
        """The tools for the prompt (none with tool_choice "none")."""
        if self.choice == "none":
            return None
        return [{"type": "function", "function": fn} for fn in self.functions.values()]

    def logit_bias(self) -> dict[int, float]:
        return {self.token: -100.0} if self.choice == "none" else {}

    def constraint(self) -> StructuredOutput | None:
        """The grammar of a forced call: the [TOOL_CALLS] token, an optional space (SentencePiece writes one),
        then a JSON list of calls of the allowed functions with schema-valid arguments."""
        if self.choice in ("auto", "none"):
            return None
        names = list(self.functions) if self.choice == "required" else [self.choice]
        variants = [{"type": "object", "properties": {
            "name": {"const": name},
            "arguments": self.functions[name].get("parameters") or {"type": "object"}},
            "required": ["name", "arguments"], "additionalProperties": False} for name in names]
        schema: dict[str, Any] = {"type": "array", "minItems": 1,
                                  "items": variants[0] if len(variants) == 1 else {"anyOf": variants},
                                  "x-guidance": CALL_JSON}
        if not self.parallel or self.choice != "required":
            schema["maxItems"] = 1
        return StructuredOutput("lark", f'start: <[{self.token}]> " "? calls\ncalls: %json {json.dumps(schema)}')

    def parse(self, output_ids: list[int], text: str) -> list[ToolCall] | None:
        """The calls an answer makes, or None where it is text: it must start with the [TOOL_CALLS] token, and
        the rest must be a JSON list of calls to known functions with object arguments."""
        if not output_ids or output_ids[0] != self.token or self.choice == "none":
            return None
        try:
            calls = json.loads(text)
        except ValueError:
            return None
        if isinstance(calls, dict):
            calls = [calls]
        if not isinstance(calls, list) or not calls:
            return None
        out = []
        for call in calls:
            if not isinstance(call, dict) or call.get("name") not in self.functions:
                return None
            arguments = call.get("arguments", {})
            if isinstance(arguments, str):
                try:
                    arguments = json.loads(arguments)
                except ValueError:
                    return None
            if not isinstance(arguments, dict):
                return None
            out.append(ToolCall(new_call_id(), call["name"], json.dumps(arguments, ensure_ascii=False)))
        return out
