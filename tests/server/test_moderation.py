"""Guardrails over HTTP: POST /v1/moderations in OpenAI's shape, and `serve --moderate input,output`.

The tiny random model's own classification (computed offline on the same checkpoint) decides what must be
flagged; the server is started to filter exactly that category.
"""

from __future__ import annotations

import json
import math

import httpx
import pytest

from mistral7b import SamplingParams
from mistral7b.moderation import ACCEPTABLE, Moderator, Policy
from tests.moderation.test_classifier import TEXTS
from tests.server.conftest import start_server


@pytest.fixture(scope="module")
def judged(tiny_llm):
    """(text, its Moderation, the greedy answer, the answer's Moderation) for every text."""
    moderator = Moderator(tiny_llm, "paper")
    params = SamplingParams(temperature=0, max_tokens=6)
    answers = [o.outputs[0].text for o in tiny_llm.chat([[{"role": "user", "content": t}] for t in TEXTS], params)]
    return list(zip(TEXTS, moderator.classify(TEXTS), answers, moderator.classify(list(zip(TEXTS, answers)))))


@pytest.fixture(scope="module")
def flagged(judged):
    return next((t, m) for t, m, _, _ in judged if m.label != ACCEPTABLE)


@pytest.fixture(scope="module")
def guarded(tiny_mistral_path, flagged, tmp_path_factory):
    _, m = flagged
    s = start_server(tiny_mistral_path, str(tmp_path_factory.mktemp("guarded")), "--moderate", "input",
                     "--moderate-categories", m.label, "--chunk-size", "64")
    yield s
    s.stop()


def test_moderations_endpoint_in_openai_shape(guarded, flagged):
    text, m = flagged
    r = httpx.post(guarded.v1 + "/moderations", json={"input": [text, "Tell me a joke."]}, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"].startswith("modr-") and body["model"] == guarded.client().models.list().data[0].id
    assert body["reliability"]["measured"] is False and "not been measured" in body["reliability"]["note"]
    assert "warning: moderation by" in open(guarded.log).read()  # said at start too
    first = body["results"][0]
    assert first["flagged"] is True and first["categories"][m.label] is True
    assert first["category_scores"] == pytest.approx(m.category_scores(), abs=1e-4)
    assert math.isclose(sum(first["category_scores"].values()) + first["acceptable_score"], 1.0, rel_tol=1e-6)
    only_others = httpx.post(guarded.v1 + "/moderations", timeout=60, json={
        "input": text, "categories": [c for c in ("illegal", "hateful", "unqualified_advice") if c != m.label]})
    assert only_others.json()["results"][0]["flagged"] is False


@pytest.mark.parametrize("body, match", [
    ({"input": ""}, "empty"),
    ({"input": ["ok", "  "]}, "input\\[1\\] is empty"),
    ({"input": "word " * 5000}, "at most"),
    ({"input": "hi", "categories": ["malware"]}, "unknown category"),
    ({"input": "hi", "taxonomy": "nope"}, "taxonomy"),
    ({"text": "hi"}, "unknown field"),
    ("not json", "JSON"),
])
def test_moderation_bad_input_is_a_400(guarded, body, match):
    content = body if isinstance(body, str) else json.dumps(body)
    r = httpx.post(guarded.v1 + "/moderations", content=content, headers={"Content-Type": "application/json"},
                   timeout=60)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    import re

    assert re.search(match, r.json()["error"]["message"]), r.json()
    assert httpx.get(guarded.url + "/health").status_code == 200


def test_flagged_prompt_is_refused_streaming_or_not(guarded, flagged, tiny_llm):
    text, m = flagged
    notice = f"[refused: your message was flagged as {Policy('paper').title(m.label)} (p={m.scores[m.label]:.2f})]"
    client = guarded.client()
    name = client.models.list().data[0].id
    messages = [{"role": "user", "content": text}]
    out = client.chat.completions.create(model=name, messages=messages, max_tokens=6, temperature=0)
    assert out.choices[0].message.content == notice and out.choices[0].finish_reason == "content_filter"
    chunks = list(client.chat.completions.create(model=name, messages=messages, max_tokens=6, temperature=0,
                                                 stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == notice
    assert chunks[-1].choices[0].finish_reason == "content_filter"
    fine = client.chat.completions.create(model=name, messages=[{"role": "user", "content": "Tell me a joke."}],
                                          max_tokens=6, temperature=0)
    want = tiny_llm.chat([{"role": "user", "content": "Tell me a joke."}], SamplingParams(temperature=0, max_tokens=6))
    if fine.choices[0].finish_reason != "content_filter":  # unless the joke request is flagged too
        assert fine.choices[0].message.content == want.outputs[0].text


def test_flagged_answer_is_withheld_even_when_streaming(tiny_mistral_path, judged, tmp_path):
    text, _, answer, m = next(j for j in judged if j[3].label != ACCEPTABLE and j[2].strip())
    s = start_server(tiny_mistral_path, str(tmp_path), "--moderate", "output", "--moderate-categories", m.label,
                     "--chunk-size", "64")
    try:
        client = s.client()
        name = client.models.list().data[0].id
        notice = f"[withheld: the answer was flagged as {Policy('paper').title(m.label)} (p={m.scores[m.label]:.2f})]"
        messages = [{"role": "user", "content": text}]
        chunks = list(client.chat.completions.create(model=name, messages=messages, max_tokens=6, temperature=0,
                                                     stream=True))
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks)
        assert streamed == notice and answer not in streamed
        out = client.chat.completions.create(model=name, messages=messages, max_tokens=6, temperature=0)
        assert out.choices[0].message.content == notice and out.choices[0].finish_reason == "content_filter"
    finally:
        s.stop()
