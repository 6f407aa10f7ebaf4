"""Tool calling through a chat template that takes `tools` and writes <tool_call> blocks (the Hermes / Qwen
style): a tiny random checkpoint in Hugging Face's layout with the embedded model's real tokenizer and a
template of that style written here. The prompt ids are transformers' apply_chat_template's; forced calls are
valid against the function's schema; auto answers that are no calls stay text."""

from __future__ import annotations

import json
import os
import re

import jsonschema
import pytest

from mistral7b.config import ModelArgs
from mistral7b.server.tool_calls import Tools
from tests.conftest import smollm2_path
from tests.server.conftest import start_server

TEMPLATE = """
{%- if tools %}<|im_start|>system
{% if messages[0].role == 'system' %}{{ messages[0].content }}

{% endif %}You may call these functions:
<tools>
{% for tool in tools %}{{ tool | tojson }}
{% endfor %}</tools>
Call one as <tool_call>
{"name": <name>, "arguments": <arguments>}
</tool_call><|im_end|>
{% elif messages[0].role == 'system' %}<|im_start|>system
{{ messages[0].content }}<|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == 'system' %}
{%- elif message.role == 'assistant' and message.tool_calls %}<|im_start|>assistant
{% for call in message.tool_calls %}<tool_call>
{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments }}}
</tool_call>
{% endfor %}<|im_end|>
{% elif message.role == 'tool' %}<|im_start|>user
<tool_response>
{{ message.content }}
</tool_response><|im_end|>
{% else %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""
ARGS = ModelArgs(dim=64, n_layers=2, head_dim=16, hidden_dim=96, n_heads=4, n_kv_heads=2, norm_eps=1e-5,
                 vocab_size=49152, rope_theta=10000.0, sliding_window=None, max_seq_len=1024)
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 16}},
           "required": ["city"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                           "parameters": WEATHER}}]
MESSAGES = [{"role": "user", "content": "Weather in Rome?"}]


@pytest.fixture(scope="module")
def hermes_folder(tmp_path_factory) -> str:
    if smollm2_path() is None:
        pytest.skip("the embedded model (its tokenizer) is not installed")
    from mistral7b.loading import open_checkpoint
    from mistral7b.engine.llm import checkpoint_tokenizer
    from mistral7b.loading.writers import save_hf
    from tests.loading.conftest import random_state

    folder = str(tmp_path_factory.mktemp("hermes"))
    save_hf(folder, ARGS, random_state(ARGS, seed=6))
    with open(os.path.join(folder, "tokenizer.json"), "w") as f:
        f.write(checkpoint_tokenizer(open_checkpoint(smollm2_path())).tokenizer_json())
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"chat_template": TEMPLATE, "eos_token": "<|im_end|>", "bos_token": None,
                   "add_bos_token": False}, f)
    return folder


@pytest.fixture(scope="module")
def hermes_server(hermes_folder, tmp_path_factory):
    s = start_server(hermes_folder, str(tmp_path_factory.mktemp("logs")), "--served-model-name", "hermes",
                     "--max-model-len", "1024")
    yield s
    s.stop()


def client(server):
    import openai

    return openai.OpenAI(base_url=server.v1, api_key="none", max_retries=0)


@pytest.mark.parametrize("stream", [False, True])
def test_forced_call_is_a_valid_tool_call_block(hermes_server, stream):
    kw = dict(model="hermes", messages=MESSAGES, tools=TOOLS, tool_choice="required", max_tokens=80, temperature=0.9,
              seed=2, parallel_tool_calls=False)
    if stream:
        chunks = list(client(hermes_server).chat.completions.create(**kw, stream=True))
        calls = [d.tool_calls[0] for c in chunks if c.choices for d in [c.choices[0].delta] if d.tool_calls]
        name, arguments = calls[0].function.name, "".join(c.function.arguments or "" for c in calls)
        reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        assert reasons == ["tool_calls"] and re.fullmatch(r"[A-Za-z0-9]{9}", calls[0].id)
    else:
        choice = client(hermes_server).chat.completions.create(**kw).choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        (call,) = choice.message.tool_calls
        name, arguments = call.function.name, call.function.arguments
    assert name == "get_weather"
    jsonschema.validate(json.loads(arguments), WEATHER)


def test_auto_answers_with_text_and_the_round_trip_prompt_is_transformers(hermes_server, hermes_folder):
    from transformers import PreTrainedTokenizerFast

    from mistral7b.engine.llm import LLM

    answer = client(hermes_server).chat.completions.create(model="hermes", messages=MESSAGES, tools=TOOLS,
                                                           max_tokens=10, temperature=0)
    assert answer.choices[0].message.content and not answer.choices[0].message.tool_calls
    conversation = MESSAGES + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "abcdefghi", "type": "function", "function": {"name": "get_weather",
                                                                 "arguments": '{"city": "Rome"}'}}]},
        {"role": "tool", "tool_call_id": "abcdefghi", "content": "sunny, 24 degrees"}]
    served = client(hermes_server).chat.completions.create(model="hermes", messages=conversation, tools=TOOLS,
                                                           max_tokens=5, temperature=0)
    reference = PreTrainedTokenizerFast(tokenizer_file=os.path.join(hermes_folder, "tokenizer.json"))
    want = reference.apply_chat_template(conversation, tools=TOOLS, chat_template=TEMPLATE,
                                         add_generation_prompt=True, tokenize=True)
    want = want["input_ids"] if hasattr(want, "keys") else want  # a BatchEncoding in newer transformers
    ours = LLM(hermes_folder, progress=False, max_model_len=1024).processor.encode_chat(conversation, tools=TOOLS)
    assert ours == list(want) and served.usage.prompt_tokens == len(want)


def test_hermes_parse_takes_only_whole_blocks():
    class Tok:
        tools_format = "hermes"

    tools = Tools.from_request(TOOLS, "auto", True, Tok())
    block = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    (call,) = tools.parse([1], block)
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Oslo"}
    assert len(tools.parse([1], block + "\n" + block)) == 2
    assert tools.parse([1], "Sure! " + block) is None  # text first: an answer, not a call
    assert tools.parse([1], block + " and more") is None
    assert tools.parse([1], block.replace("get_weather", "format_disk")) is None
    assert tools.starts([1], "<tool_") is None and tools.starts([1], "Hello") is False
    assert tools.starts([1], "  <tool_call>{") is True


def test_a_separate_tool_use_template_is_the_one_tools_go_through(hermes_folder, tmp_path):
    """tokenizer_config.json listing a "default" template without tools and a "tool_use" one: chats with tools
    render through the latter (as transformers picks it), chats without through the former."""
    import shutil

    from transformers import PreTrainedTokenizerFast

    from mistral7b.tokenizer.hf import load_hf_folder

    folder = tmp_path / "named"
    shutil.copytree(hermes_folder, folder)
    plain = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}" \
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    config = {"chat_template": [{"name": "default", "template": plain}, {"name": "tool_use", "template": TEMPLATE}],
              "eos_token": "<|im_end|>", "bos_token": None, "add_bos_token": False}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    ours = load_hf_folder(str(folder))
    assert ours.tools_format == "hermes"
    reference = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))
    for tools, template in ((TOOLS, TEMPLATE), (None, plain)):
        want = reference.apply_chat_template(MESSAGES, tools=tools, chat_template=template,
                                             add_generation_prompt=True, tokenize=True)
        want = want["input_ids"] if hasattr(want, "keys") else want
        assert ours.encode_chat(MESSAGES, tools=tools) == list(want)
