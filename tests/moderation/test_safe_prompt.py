"""The safe prompt through the Python API equals mistral-common's ids with the paper's prompt as system prompt."""

from __future__ import annotations

from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from mistral7b import SamplingParams
from mistral7b.guardrails import SAFE_PROMPT
from tests.tokenizer.conftest import V1

CHAT = [{"role": "user", "content": "How do I kill a linux process?"},
        {"role": "assistant", "content": "Use kill <PID>."},
        {"role": "user", "content": "And if it ignores that?"}]


def reference(messages: list[dict]) -> list[int]:
    return MistralTokenizer.from_file(V1).encode_chat_completion(ChatCompletionRequest(messages=messages)).tokens


def test_llm_safe_prompt_ids_equal_mistral_common(tiny_llm):
    want = reference([{"role": "system", "content": SAFE_PROMPT}, *CHAT])
    assert tiny_llm.encode_chat(CHAT, safe_prompt=True) == want
    out = tiny_llm.chat(CHAT, SamplingParams(temperature=0, max_tokens=2), safe_prompt=True)
    assert out.prompt_token_ids == want
    assert tiny_llm.chat(CHAT, SamplingParams(temperature=0, max_tokens=2)).prompt_token_ids == reference(CHAT)


def test_safe_prompt_goes_before_the_users_system_prompt(tiny_llm):
    mine = [{"role": "system", "content": "Answer in French."}, *CHAT]
    want = reference([{"role": "system", "content": f"{SAFE_PROMPT}\n\nAnswer in French."}, *CHAT])
    assert tiny_llm.encode_chat(mine, safe_prompt=True) == want
