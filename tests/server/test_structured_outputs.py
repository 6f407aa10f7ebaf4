"""Structured outputs through `mistral7b serve` and the official `openai` client: OpenAI's response_format
(json_schema, json_object) and vLLM's structured_outputs / guided_* fields, streamed and not, greedy and sampled,
every answer checked by `jsonschema` or `re` (a random-weight model cannot match by chance); the served answer
equals the offline engine's; bad constraints are 400s."""

from __future__ import annotations

import asyncio
import json
import re

import jsonschema
import pytest

from mistral7b import SamplingParams
from mistral7b.engine.structured_output import StructuredOutput
from tests.server.conftest import MODEL

SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 10},
        "population": {"type": "integer", "minimum": 0, "maximum": 10**7},
        "coastal": {"type": "boolean"},
        "districts": {"type": "array", "items": {"type": "object", "properties": {
            "name": {"type": "string", "maxLength": 8}, "kind": {"enum": ["north", "south", "old town"]}},
            "required": ["name", "kind"], "additionalProperties": False}, "minItems": 1, "maxItems": 2},
        "rating": {"type": "number", "minimum": 0, "maximum": 5},
    },
    "required": ["city", "population", "coastal", "districts"],
    "additionalProperties": False,
}
FORMAT = {"type": "json_schema", "json_schema": {"name": "city", "schema": SCHEMA, "strict": True}}
MESSAGES = [{"role": "user", "content": "Describe a city as JSON."}]


def test_twenty_concurrent_json_schema_answers_validate(server):
    """Greedy and sampled, streamed and not, all at once: every answer parses and validates."""
    client = server.async_client()

    async def one(i: int) -> tuple[str, str]:
        kw = dict(model=MODEL, messages=MESSAGES, max_tokens=300, response_format=FORMAT,
                  temperature=0.0 if i % 2 else 1.0, seed=i)
        if i % 4 < 2:
            out = await client.chat.completions.create(**kw)
            return out.choices[0].message.content, out.choices[0].finish_reason
        text, reason = "", None
        async for chunk in await client.chat.completions.create(**kw, stream=True):
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                reason = chunk.choices[0].finish_reason or reason
        return text, reason

    async def run():
        try:
            return await asyncio.gather(*(one(i) for i in range(20)))
        finally:
            await client.close()

    for text, reason in asyncio.run(run()):
        assert reason == "stop", text
        jsonschema.validate(json.loads(text), SCHEMA)


def test_served_answer_equals_offline(server, offline):
    out = server.client().chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=300, temperature=0,
                                                  response_format=FORMAT)
    ref = offline.generate({"prompt_token_ids": offline.encode_chat(MESSAGES)}, SamplingParams(
        max_tokens=300, temperature=0, structured=StructuredOutput.json_schema(SCHEMA)))[0].outputs[0]
    assert out.choices[0].message.content == ref.text
    assert out.usage.completion_tokens == len(ref.token_ids)


@pytest.mark.parametrize("stream", [False, True])
def test_regex_choice_and_json_object_fields(server, stream):
    client = server.client()

    def complete(**extra) -> str:
        kw = dict(model=MODEL, prompt="Answer:", max_tokens=60, temperature=0.7, seed=2, extra_body=extra)
        if not stream:
            return client.completions.create(**kw).choices[0].text
        return "".join(c.choices[0].text for c in client.completions.create(**kw, stream=True) if c.choices)

    pattern = r"[A-Z][a-z]{2,5}-[0-9]{2}"
    assert re.fullmatch(pattern, complete(structured_outputs={"regex": pattern}))
    assert re.fullmatch(r"(yes|no)!", complete(guided_regex=r"(yes|no)!"))
    assert complete(structured_outputs={"choice": ["cat", "dog", "parrot"]}) in ("cat", "dog", "parrot")
    assert complete(guided_choice=["left", "right"]) in ("left", "right")
    assert re.fullmatch(r"x+y", complete(guided_grammar='start: "x"+ "y"'))
    text = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=200, temperature=0,
                                          response_format={"type": "json_object"}).choices[0].message.content
    assert text.lstrip().startswith("{")


@pytest.mark.parametrize("body,words", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "frobnicate"}}}},
     "json"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "schema"),
    ({"structured_outputs": {"regex": "([a-"}}, "regex"),
    ({"structured_outputs": {"choice": []}}, "choice"),
    ({"guided_regex": "a+", "guided_choice": ["a"]}, "one structured output"),
    ({"structured_outputs": {"grammar": "start: nowhere"}}, "grammar"),
])
def test_bad_constraints_are_400s(server, body, words):
    import openai

    with pytest.raises(openai.BadRequestError) as e:
        server.client().chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=5, extra_body=body,
                                                stream=True)
    assert words in str(e.value.body).lower()
