"""Tool calling for Mistral models through `mistral7b serve` and the official `openai` client, on a tiny random
checkpoint with Mistral's v3 tokenizer: tool_choice required / named / auto / none, streamed and not; call ids
of 9 letters and digits; arguments valid against the function's schema (a random model cannot do that by
chance: the grammar forces it); a full round trip whose prompt ids equal mistral-common's; bad input as 400s."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from mistral7b.server.tool_calls import Tools
from tests.server.conftest import v3_tokenizer

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                            "unit": {"enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"], "additionalProperties": False}
TIME = {"type": "object", "properties": {"timezone": {"type": "string", "maxLength": 20}}, "required": ["timezone"],
        "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "description": "The time in a timezone",
                                           "parameters": TIME}}]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]


def client(server):
    import openai

    return openai.OpenAI(base_url=server.v1, api_key="none", max_retries=0)


def assert_valid_call(call, allowed=("get_weather", "get_time")):
    assert re.fullmatch(r"[A-Za-z0-9]{9}", call.id) and call.type == "function"
    assert call.function.name in allowed
    jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_required_answers_with_valid_calls(v3_server, temperature):
    out = client(v3_server).chat.completions.create(model="tiny-v3", messages=MESSAGES, tools=TOOLS,
                                                    tool_choice="required", max_tokens=200, temperature=temperature,
                                                    seed=3, n=2, parallel_tool_calls=False)
    for choice in out.choices:
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        assert len(choice.message.tool_calls) == 1
        assert_valid_call(choice.message.tool_calls[0])


def test_named_function_is_the_one_called(v3_server):
    out = client(v3_server).chat.completions.create(
        model="tiny-v3", messages=MESSAGES, tools=TOOLS, max_tokens=200, temperature=0.8, seed=1,
        tool_choice={"type": "function", "function": {"name": "get_time"}})
    (call,) = out.choices[0].message.tool_calls
    assert_valid_call(call, allowed=("get_time",))


def test_streamed_call_sends_the_name_then_the_arguments(v3_server):
    chunks = list(client(v3_server).chat.completions.create(
        model="tiny-v3", messages=MESSAGES, tools=TOOLS, tool_choice="required", max_tokens=200, temperature=0,
        stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    calls = [d.tool_calls[0] for d in deltas if d.tool_calls]
    assert calls[0].id and calls[0].function.name in SCHEMAS and calls[0].function.arguments == ""
    arguments = "".join(c.function.arguments or "" for c in calls)
    jsonschema.validate(json.loads(arguments), SCHEMAS[calls[0].function.name])
    assert not any(d.content for d in deltas)
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]
    whole = client(v3_server).chat.completions.create(model="tiny-v3", messages=MESSAGES, tools=TOOLS,
                                                      tool_choice="required", max_tokens=200, temperature=0)
    (call,) = whole.choices[0].message.tool_calls
    assert (call.function.name, call.function.arguments) == (calls[0].function.name, arguments)


@pytest.mark.parametrize("stream", [False, True])
def test_none_and_auto_answer_with_text(v3_server, stream):
    """A random model does not start with [TOOL_CALLS] by itself (auto); with none the token is banned."""
    for choice in ("none", "auto"):
        kw = dict(model="tiny-v3", messages=MESSAGES, tools=TOOLS, tool_choice=choice, max_tokens=12,
                  temperature=0)
        if stream:
            chunks = list(client(v3_server).chat.completions.create(**kw, stream=True))
            assert not any(c.choices[0].delta.tool_calls for c in chunks if c.choices)
            assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        else:
            msg = client(v3_server).chat.completions.create(**kw).choices[0].message
            assert msg.content and not msg.tool_calls


def test_round_trip_prompt_equals_mistral_common(v3_server, v3_folder):
    """call -> tool result -> answer: the served conversation is accepted, and its prompt ids are exactly
    mistral-common's encoding of the same conversation and tools."""
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    from mistral7b.engine.llm import LLM

    first = client(v3_server).chat.completions.create(model="tiny-v3", messages=MESSAGES, tools=TOOLS,
                                                      tool_choice="required", max_tokens=200, temperature=0)
    call = first.choices[0].message.tool_calls[0]
    conversation = MESSAGES + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call.id, "type": "function", "function": {"name": call.function.name,
                                                             "arguments": call.function.arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": "22 degrees and sunny"}]
    answer = client(v3_server).chat.completions.create(model="tiny-v3", messages=conversation, tools=TOOLS,
                                                       max_tokens=8, temperature=0)
    assert answer.choices[0].message.content is not None
    ours = LLM(v3_folder, progress=False, max_model_len=1024).processor.encode_chat(conversation, tools=TOOLS)
    reference = MistralTokenizer.from_file(v3_tokenizer()).encode_chat_completion(
        ChatCompletionRequest(messages=conversation, tools=TOOLS)).tokens
    assert ours == reference
    assert answer.usage.prompt_tokens == len(reference)


def test_auto_parses_only_a_real_call():
    from mistral7b.tokenizer.mistral import MistralCommonTokenizer

    tokenizer = MistralCommonTokenizer(v3_tokenizer())
    tools = Tools.from_request(TOOLS, "auto", True, tokenizer)
    text = ' [{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}}]'
    (call,) = tools.parse([tools.token, 1, 2], text)
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Oslo", "unit": "celsius"}
    assert tools.parse([7, 8], text) is None  # looks like a call, but no [TOOL_CALLS] token: text
    assert tools.parse([tools.token], ' [{"name": "rm_rf", "arguments": {}}]') is None  # unknown function
    assert tools.parse([tools.token], ' [{"name": "get_weather", "arguments": ') is None  # cut short
    assert tools.parse([tools.token], ' [{"name": "get_time", "arguments": "[1]"}]') is None  # not an object
    calls = tools.parse([tools.token], json.dumps([{"name": "get_time", "arguments": {"timezone": "UTC"}},
                                                   {"name": "get_weather", "arguments": {"city": "Rome",
                                                                                         "unit": "celsius"}}]))
    assert [c.name for c in calls] == ["get_time", "get_weather"] and calls[0].id != calls[1].id


@pytest.mark.parametrize("body,words", [
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "launch"}}}, "launch"),
    ({"tools": TOOLS + TOOLS[:1]}, "twice"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "combined"),
    ({"tool_choice": "required"}, "no tools"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "name"),
])
def test_bad_tool_requests_are_400s(v3_server, body, words):
    import openai

    with pytest.raises(openai.BadRequestError) as e:
        client(v3_server).chat.completions.create(model="tiny-v3", messages=MESSAGES, max_tokens=5, extra_body=body)
    assert words in str(e.value.body).lower()


def test_tools_for_a_model_without_a_tool_format_are_a_400(server):
    """The v1 tokenizer has no [TOOL_CALLS]: a clear 400, not a prompt without the tools."""
    import openai

    with pytest.raises(openai.BadRequestError) as e:
        server.client().chat.completions.create(model="tiny-mistral", messages=MESSAGES, tools=TOOLS, max_tokens=5)
    assert "tool-calling format" in str(e.value.body)


@pytest.mark.parametrize("stream", [False, True])
def test_auto_answer_that_starts_a_call_but_is_no_call_stays_text(v3_server, stream):
    """An answer of [TOOL_CALLS] tokens (logit_bias) that is no JSON list of calls: the answer is sent as text
    (empty: the token has none) with its own finish reason, streamed or not, never as a call."""
    kw = dict(model="tiny-v3", messages=MESSAGES, tools=TOOLS, tool_choice="auto", max_tokens=10, temperature=0,
              logit_bias={"5": 100})
    if stream:
        chunks = list(client(v3_server).chat.completions.create(**kw, stream=True))
        deltas = [c.choices[0].delta for c in chunks if c.choices]
        assert not any(d.tool_calls for d in deltas) and any(d.content is not None for d in deltas)
        assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    else:
        choice = client(v3_server).chat.completions.create(**kw).choices[0]
        assert choice.message.content == "" and not choice.message.tool_calls and choice.finish_reason == "length"
