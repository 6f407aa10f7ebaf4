"""The served API through the official `openai` client: chat and completions, streaming and not, against the
offline engine on the same checkpoint."""

from __future__ import annotations

import httpx
import pytest

from mistral7b import SamplingParams
from mistral7b.guardrails import SAFE_PROMPT
from tests.server.conftest import API_KEY, MODEL, W

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name three colours."}]


def test_models_and_health(server):
    import openai

    client = server.client()
    assert [m.id for m in client.models.list().data] == [MODEL]
    card = client.models.retrieve(MODEL)  # GET /v1/models/{id}
    assert card.id == MODEL and card.object == "model"
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("no-such-model")
    assert e.value.body["code"] == "model_not_found"
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}


def test_chat_streamed_equals_whole_and_offline(server, offline):
    client = server.client()
    whole = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=20, temperature=0)
    ids = offline.encode_chat(MESSAGES)
    ref = offline.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=20, temperature=0))[0].outputs[0]
    choice = whole.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == ref.text
    assert choice.finish_reason == ref.finish_reason
    assert whole.usage.prompt_tokens == len(ids) and whole.usage.completion_tokens == len(ref.token_ids)
    assert whole.usage.total_tokens == len(ids) + len(ref.token_ids)
    chunks = list(client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=20, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len({c.id for c in chunks}) == 1
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == \
        [choice.finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_chat_logprobs_and_n(server, offline):
    client = server.client()
    out = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=6, temperature=0,
                                         logprobs=True, top_logprobs=3, n=2)
    assert len(out.choices) == 2 and out.choices[0].message.content == out.choices[1].message.content
    ref = offline.generate({"prompt_token_ids": offline.encode_chat(MESSAGES)},
                           SamplingParams(max_tokens=6, temperature=0, logprobs=True))[0].outputs[0]
    content = out.choices[0].logprobs.content
    assert [e.logprob for e in content] == pytest.approx(ref.logprobs, abs=1e-4)
    assert "".join(e.token for e in content) == out.choices[0].message.content
    for e in content:
        assert len(e.top_logprobs) == 3 and e.top_logprobs[0].logprob == pytest.approx(e.logprob, abs=1e-5)
        assert bytes(e.bytes).decode() == e.token


def test_completions_text_ids_batch_and_stream(server, offline):
    client = server.client()
    prompts = ["Once upon a time", "The window is " + "very " * (3 * W)]  # the second is over 3W tokens
    out = client.completions.create(model=MODEL, prompt=prompts, max_tokens=12, temperature=0)
    refs = offline.generate(prompts, SamplingParams(max_tokens=12, temperature=0))
    assert [c.index for c in out.choices] == [0, 1]
    assert [c.text for c in out.choices] == [r.outputs[0].text for r in refs]
    assert out.usage.prompt_tokens == sum(len(r.prompt_token_ids) for r in refs)
    by_ids = client.completions.create(model=MODEL, prompt=refs[1].prompt_token_ids, max_tokens=12, temperature=0)
    assert by_ids.choices[0].text == refs[1].outputs[0].text
    streamed = client.completions.create(model=MODEL, prompt=prompts[1], max_tokens=12, temperature=0,
                                         stream=True, stream_options={"include_usage": True})
    chunks = list(streamed)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == refs[1].outputs[0].text
    assert chunks[-1].usage.completion_tokens == len(refs[1].outputs[0].token_ids)


def test_echo_with_logprobs_scores_the_prompt(server, offline):
    """lm-evaluation-harness's local-completions request: echo, logprobs=1, max_tokens=0 or 1."""
    client = server.client()
    ids = offline.encode_prompt("The quick brown fox jumps over the lazy dog " * 4)
    ref = offline.score([ids])[0].logprobs
    for max_tokens in (0, 1):
        out = client.completions.create(model=MODEL, prompt=ids, max_tokens=max_tokens, temperature=0, echo=True,
                                        logprobs=1)
        lp = out.choices[0].logprobs
        assert lp.token_logprobs[0] is None and len(lp.token_logprobs) == len(ids) + max_tokens
        assert lp.token_logprobs[1 : len(ids)] == pytest.approx(ref, abs=1e-4)
        for got, top in zip(lp.token_logprobs[1:], lp.top_logprobs[1:]):
            assert max(top.values()) >= got - 1e-6
        assert out.usage.completion_tokens == max_tokens
        assert out.choices[0].text.startswith(offline.tokenizer.decode(ids))


def test_sampling_with_seed_is_reproducible(server):
    client = server.client()
    kw = dict(model=MODEL, prompt="Hello", max_tokens=16, temperature=1.0, seed=1234, n=3)
    first = [c.text for c in client.completions.create(**kw).choices]
    assert first == [c.text for c in client.completions.create(**kw).choices]
    assert len(set(first)) > 1


def test_sampling_fields_left_out_take_the_model_defaults(server, offline):
    """As vLLM's --generation-config auto: this checkpoint has no generation_config.json, so llama.cpp's
    defaults (temperature 0.8, top-k 40, top-p 0.95, min-p 0.05) fill what a request leaves out."""
    client = server.client()
    out = client.completions.create(model=MODEL, prompt="Hello", max_tokens=12, seed=99)
    want = offline.generate("Hello", offline.default_sampling_params(max_tokens=12, seed=99))[0].outputs[0]
    assert offline.sampling_defaults.top_k == 40 and out.choices[0].text == want.text
    neutral = client.completions.create(model=MODEL, prompt="Hello", max_tokens=12, seed=99, temperature=1.0,
                                        top_p=1.0, extra_body={"top_k": -1, "min_p": 0.0})
    plain = offline.generate("Hello", SamplingParams(max_tokens=12, seed=99))[0].outputs[0]
    assert neutral.choices[0].text == plain.text != want.text
    chat = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8, seed=5)
    want = offline.chat(MESSAGES, offline.default_sampling_params(max_tokens=8, seed=5)).outputs[0]
    assert chat.choices[0].message.content == want.text


def test_generation_config_none_means_openai_defaults(tiny_model, offline, tmp_path):
    from tests.server.conftest import start_server

    s = start_server(tiny_model, str(tmp_path), "--generation-config", "none", "--served-model-name", MODEL)
    try:
        out = s.client(api_key="unused").completions.create(model=MODEL, prompt="Hello", max_tokens=12, seed=99)
    finally:
        s.stop()
    assert out.choices[0].text == offline.generate("Hello", SamplingParams(max_tokens=12, seed=99))[0].outputs[0].text


def test_safe_prompt_field_puts_the_guardrail_first(server, offline):
    plain = httpx.post(server.url + "/tokenize", headers={"Authorization": f"Bearer {API_KEY}"},
                       json={"messages": MESSAGES}).json()["tokens"]
    safe = httpx.post(server.url + "/tokenize", headers={"Authorization": f"Bearer {API_KEY}"},
                      json={"messages": MESSAGES, "safe_prompt": True}).json()["tokens"]
    assert plain == offline.encode_chat(MESSAGES)
    assert safe == offline.encode_chat([{"role": "system", "content": SAFE_PROMPT}, *MESSAGES])
    out = server.client().chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4, temperature=0,
                                                  extra_body={"safe_prompt": True})
    assert out.usage.prompt_tokens == len(safe)


def test_tokenize_detokenize_and_tokenizer_info(server, offline):
    headers = {"Authorization": f"Bearer {API_KEY}"}
    tok = httpx.post(server.url + "/tokenize", headers=headers,
                     json={"prompt": "Hello world", "add_special_tokens": False}).json()
    assert tok["tokens"] == offline.tokenizer.encode("Hello world", add_bos=False) and tok["count"] == 2
    text = httpx.post(server.url + "/detokenize", headers=headers, json={"tokens": tok["tokens"]}).json()
    assert text == {"prompt": "Hello world"}
    framed = [1, *tok["tokens"], 2]  # <s> ... </s>
    assert httpx.post(server.url + "/detokenize", headers=headers, json={"tokens": framed}).json() == text
    kept = httpx.post(server.url + "/detokenize", headers=headers,
                      json={"tokens": framed, "skip_special_tokens": False}).json()["prompt"]
    assert kept.startswith("<s>") and kept.endswith("</s>")  # as mistral-common writes them (KEEP)


def test_a_stop_token_id_keeps_its_text(server, offline):
    """stop_token_ids end the completion at that token and keep its text, as vLLM does (EOS and special tokens
    have none); the finish reason is "stop"."""
    ref = offline.generate("Hello", SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))[0].outputs[0]
    at = next(i for i, t in enumerate(ref.token_ids) if i >= 2 and offline.tokenizer.decode([t]).strip())
    stop = ref.token_ids[at]
    want = offline.generate("Hello", SamplingParams(max_tokens=at + 1, temperature=0, ignore_eos=True))[0].outputs[0]
    assert want.token_ids[-1] == stop and want.text
    client = server.client()
    for stream in (False, True):
        kw = dict(model=MODEL, prompt="Hello", max_tokens=12, temperature=0, stream=stream,
                  extra_body={"stop_token_ids": [stop], "ignore_eos": True})
        if stream:
            chunks = list(client.completions.create(**kw))
            text = "".join(c.choices[0].text for c in chunks if c.choices)
            reason = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
        else:
            out = client.completions.create(**kw).choices[0]
            text, reason = out.text, out.finish_reason
        assert text == want.text and reason == "stop"
    offline_out = offline.generate("Hello", SamplingParams(max_tokens=12, temperature=0, ignore_eos=True,
                                                           stop_token_ids=[stop]))[0].outputs[0]
    assert offline_out.text == want.text and offline_out.token_ids == want.token_ids



@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "The colour is"}],
    [{"role": "system", "content": "Be brief."}],
])
def test_chat_continues_a_last_assistant_message_and_takes_system_only_chats(server, offline, messages):
    """A chat ending with an assistant message is continued (the reply is the continuation only), and a
    system-only chat is rendered as the model's format allows: both as the offline engine answers them."""
    out = server.client().chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0)
    ids = offline.encode_chat(messages)
    want = offline.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=8, temperature=0))[0].outputs[0]
    assert out.choices[0].message.content == want.text
    if messages[-1]["role"] == "assistant":
        assert offline.tokenizer.decode(ids).endswith("The colour is")


def test_prompt_logprobs_in_vllms_shape(server, offline):
    """prompt_logprobs=k: per prompt token (None first) the token with its log-probability (the scoring path's),
    its rank among all tokens and its text, and the k most likely ranked 1..k; streamed once, in the first
    chunk; alongside echo's own logprobs of another k."""
    client = server.client()
    ids = offline.encode_prompt("The quick brown fox jumps over the lazy dog")
    ref = offline.score([ids])[0].logprobs
    k = 3
    out = client.completions.create(model=MODEL, prompt=ids, max_tokens=2, temperature=0,
                                    extra_body={"prompt_logprobs": k})
    rows = out.choices[0].model_extra["prompt_logprobs"]
    assert rows[0] is None and len(rows) == len(ids)
    for i, row in enumerate(rows[1:], start=1):
        own = row[str(ids[i])]
        assert own["logprob"] == pytest.approx(ref[i - 1], abs=1e-4)
        assert own["decoded_token"] == offline.tokenizer.decode(ids[: i + 1])[len(offline.tokenizer.decode(ids[:i])):]
        ranked = sorted((v["rank"], v["logprob"]) for t, v in row.items() if t != str(ids[i]) or v["rank"] <= k)
        assert [r for r, _ in ranked][:k] == list(range(1, k + 1))
        assert all(a >= b for (_, a), (_, b) in zip(ranked, ranked[1:]))  # rank 1 the most likely
        higher = sum(1 for t, v in row.items() if t != str(ids[i]) and v["logprob"] > own["logprob"])
        assert own["rank"] == higher + 1 if own["rank"] <= k else own["rank"] > k
    chunks = list(client.completions.create(model=MODEL, prompt=ids, max_tokens=2, temperature=0, stream=True,
                                            extra_body={"prompt_logprobs": k}))
    carrying = [c for c in chunks if c.choices and c.choices[0].model_extra.get("prompt_logprobs")]
    assert len(carrying) == 1 and carrying[0].choices[0].model_extra["prompt_logprobs"] == rows
    echo = client.completions.create(model=MODEL, prompt=ids, max_tokens=0, echo=True, logprobs=1,
                                     extra_body={"prompt_logprobs": k})
    assert all(top is None or len(top) <= 2 for top in echo.choices[0].logprobs.top_logprobs)  # echo's own k
    assert len(echo.choices[0].model_extra["prompt_logprobs"][1]) >= k
