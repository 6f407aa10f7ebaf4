"""Request bodies of the OpenAI API (and vLLM's extensions), validated strictly: a wrong type, a value out of
range or a non-finite float is a 400 naming the field, before any work is done. Every list and string has a
bound. Unknown fields are ignored, as vLLM and OpenAI's own clients expect (they send extras).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from mistral7b.engine.generation_config import NEUTRAL, SAMPLING_FIELDS, SamplingDefaults
from mistral7b.engine.sampling_params import SamplingParams
from mistral7b.engine.structured_output import StructuredOutput
from mistral7b.errors import RequestError

MAX_PROMPTS = 256  # prompts in one /v1/completions batch
MAX_TOKENS_IN_PROMPT = 1 << 20
MAX_TEXT = 4 << 20  # characters of one prompt or message
MAX_MESSAGES = 1024
MAX_N = 16

Text = Annotated[str, Field(max_length=MAX_TEXT)]
TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(max_length=MAX_TOKENS_IN_PROMPT)]
StopStrings = Union[Annotated[str, Field(max_length=256)], Annotated[list[Annotated[str, Field(max_length=256)]],
                                                                      Field(max_length=16)]]


class Strict(BaseModel):
    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="ignore")


class StreamOptions(Strict):
    include_usage: bool = False


class JSONSchemaFormat(Strict):
    name: Annotated[str, Field(max_length=256)] = "response"
    description: Annotated[str, Field(max_length=MAX_TEXT)] | None = None
    schema_: Any = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class StructuredOutputs(Strict):
    """vLLM's `structured_outputs`: exactly one of these."""

    json_: Any = Field(default=None, alias="json")
    regex: Annotated[str, Field(max_length=1 << 16)] | None = None
    choice: Annotated[list[Annotated[str, Field(min_length=1, max_length=1 << 12)]],
                      Field(min_length=1, max_length=256)] | None = None
    grammar: Annotated[str, Field(max_length=1 << 16)] | None = None
    json_object: bool | None = None


def _constraints(schema: Any, regex: str | None, choice: list[str] | None,
                 grammar: str | None) -> list[StructuredOutput]:
    """The constraints among vLLM's json / regex / choice / grammar fields that are set."""
    out = []
    if schema is not None:
        out.append(StructuredOutput.json_schema(schema))
    if regex is not None:
        out.append(StructuredOutput("regex", regex))
    if choice is not None:
        out.append(StructuredOutput("choice", tuple(choice)))
    if grammar is not None:
        out.append(StructuredOutput("grammar", grammar))
    return out


class SamplingFields(Strict):
    """Fields both endpoints share: OpenAI's, then vLLM's extensions."""

    model: Annotated[str, Field(max_length=512)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    n: Annotated[int, Field(ge=1, le=MAX_N)] = 1
    seed: Annotated[int, Field(ge=0, lt=2**63)] | None = None
    stop: StopStrings | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] = 0.0
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] = 0.0
    logit_bias: Annotated[dict[str, Annotated[float, Field(ge=-100, le=100)]], Field(max_length=1024)] | None = None
    user: Annotated[str, Field(max_length=512)] | None = None
    top_k: Annotated[int, Field(ge=-1, le=1 << 20)] | None = None
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0.0, le=100.0)] | None = None
    ignore_eos: bool = False
    min_tokens: Annotated[int, Field(ge=0, le=1 << 20)] = 0
    stop_token_ids: Annotated[list[Annotated[int, Field(ge=0)]], Field(max_length=64)] | None = None
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    guided_json: Any = None  # vLLM's older names for structured_outputs' fields
    guided_regex: Annotated[str, Field(max_length=1 << 16)] | None = None
    guided_choice: Annotated[list[Annotated[str, Field(min_length=1, max_length=1 << 12)]],
                             Field(min_length=1, max_length=256)] | None = None
    guided_grammar: Annotated[str, Field(max_length=1 << 16)] | None = None

    def structured(self) -> StructuredOutput | None:
        """The one constraint the request asks for (response_format, structured_outputs or a guided_* field),
        or None; two at once is a 400."""
        asked = []
        if self.response_format is not None and self.response_format.type == "json_object":
            asked.append(StructuredOutput("json_object"))
        elif self.response_format is not None and self.response_format.type == "json_schema":
            spec = self.response_format.json_schema
            if spec is None or spec.schema_ is None:
                raise RequestError("response_format json_schema needs json_schema.schema")
            asked.append(StructuredOutput.json_schema(spec.schema_))
        so = self.structured_outputs
        if so is not None:
            asked += _constraints(so.json_, so.regex, so.choice, so.grammar)
            if so.json_object:
                asked.append(StructuredOutput("json_object"))
        asked += _constraints(self.guided_json, self.guided_regex, self.guided_choice, self.guided_grammar)
        if len(asked) > 1:
            raise RequestError("ask for one structured output at a time (response_format, structured_outputs or "
                               "one guided_* field)")
        return asked[0] if asked else None

    def check_stream_options(self) -> None:
        if self.stream_options is not None and not self.stream:
            raise RequestError("stream_options is only allowed with stream: true")

    def sampling_params(self, max_tokens: int, defaults: SamplingDefaults = NEUTRAL, **extra: Any) -> SamplingParams:
        """The request's SamplingParams; the sampling fields it leaves out take `defaults` (the model's)."""
        bias = {}
        for key, value in (self.logit_bias or {}).items():
            if not key.isdigit():
                raise RequestError(f"logit_bias: keys must be token ids, got {key!r}")
            bias[int(key)] = value
        given = {name: getattr(self, name) for name in SAMPLING_FIELDS if getattr(self, name) is not None}
        if "top_k" in given:
            given["top_k"] = max(given["top_k"], 0)  # vLLM's -1: no top-k
        return SamplingParams(
            max_tokens=max_tokens, **{**defaults.fields(), **given}, presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty, seed=self.seed,
            stop=[self.stop] if isinstance(self.stop, str) else list(self.stop or []),
            stop_token_ids=list(self.stop_token_ids or []), ignore_eos=self.ignore_eos,
            min_tokens=min(self.min_tokens, max_tokens), n=self.n, logit_bias=bias, structured=self.structured(),
            **extra,
        )

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(SamplingFields):
    prompt: Union[Text, TokenIds, Annotated[list[Text], Field(max_length=MAX_PROMPTS)],
                  Annotated[list[TokenIds], Field(max_length=MAX_PROMPTS)]]
    max_tokens: Annotated[int, Field(ge=0, le=1 << 20)] | None = 16
    echo: bool = False
    logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    prompt_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None  # vLLM's: each prompt token's, top N
    suffix: Annotated[str, Field(max_length=MAX_TEXT)] | None = None
    best_of: Annotated[int, Field(ge=1, le=MAX_N)] | None = None


class TextPart(Strict):
    type: Literal["text"]
    text: Text


FunctionName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]


class FunctionCallIn(Strict):
    name: FunctionName
    arguments: Annotated[str, Field(max_length=MAX_TEXT)]


class ToolCallIn(Strict):
    id: Annotated[str, Field(min_length=1, max_length=64)]
    type: Literal["function"] = "function"
    function: FunctionCallIn


class ChatMessage(Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[Text, Annotated[list[TextPart], Field(max_length=256)], None] = None
    name: Annotated[str, Field(max_length=256)] | None = None
    tool_calls: Annotated[list[ToolCallIn], Field(max_length=64)] | None = None  # an assistant's calls
    tool_call_id: Annotated[str, Field(min_length=1, max_length=64)] | None = None  # a tool message's call

    def plain(self) -> dict[str, Any]:
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        if self.role == "tool":
            if self.tool_call_id is None:
                raise RequestError("messages: a tool message needs tool_call_id")
            return {"role": "tool", "content": content or "", "tool_call_id": self.tool_call_id,
                    **({"name": self.name} if self.name else {})}
        if self.role == "assistant" and self.tool_calls:
            return {"role": "assistant", "content": content or None, "tool_calls": [
                {"id": c.id, "function": {"name": c.function.name, "arguments": c.function.arguments}}
                for c in self.tool_calls]}
        return {"role": "system" if self.role == "developer" else self.role, "content": content or ""}


class FunctionSpec(Strict):
    name: FunctionName
    description: Annotated[str, Field(max_length=MAX_TEXT)] | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolSpec(Strict):
    type: Literal["function"]
    function: FunctionSpec


class NamedFunction(Strict):
    name: FunctionName


class NamedToolChoice(Strict):
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)]
    max_tokens: Annotated[int, Field(ge=1, le=1 << 20)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1, le=1 << 20)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    tools: Annotated[list[ToolSpec], Field(max_length=128)] | None = None
    tool_choice: Union[Literal["none", "auto", "required"], NamedToolChoice, None] = None
    parallel_tool_calls: bool = True
    safe_prompt: bool = False

    def tool_list(self) -> list[dict[str, Any]] | None:
        """The tools as plain OpenAI objects (what mistral-common takes)."""
        if not self.tools:
            return None
        return [{"type": "function", "function": t.function.model_dump(exclude_none=True)} for t in self.tools]

    def tool_choice_plain(self) -> Any:
        if isinstance(self.tool_choice, NamedToolChoice):
            return {"type": "function", "function": {"name": self.tool_choice.function.name}}
        return self.tool_choice


class TokenizeRequest(Strict):
    model: Annotated[str, Field(max_length=512)] | None = None
    prompt: Text | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    safe_prompt: bool = False


class DetokenizeRequest(Strict):
    model: Annotated[str, Field(max_length=512)] | None = None
    tokens: TokenIds
    skip_special_tokens: bool = True  # False: special tokens written as their vocabulary entries
