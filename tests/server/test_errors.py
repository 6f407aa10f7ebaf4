"""Every bad request gets its status and an OpenAI error object (no traceback, no path), and the server stays
healthy: a normal request succeeds right after."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.conftest import smollm2_path
from tests.server.conftest import API_KEY, MODEL, start_server

AUTH = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
COMPLETION = {"model": MODEL, "prompt": "Hi", "max_tokens": 4}


def post(server, path: str, body, headers=AUTH, raw: bool = False) -> httpx.Response:
    content = body if raw else json.dumps(body)
    return httpx.post(server.url + path, content=content, headers=headers, timeout=60)


def assert_error(r: httpx.Response, status: int, param: str | None = None, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert "Traceback" not in r.text and "/work/" not in r.text and ".py" not in r.text
    if param is not None:
        assert err["param"] == param
    if code is not None:
        assert err["code"] == code
    return err


def assert_still_serves(server) -> None:
    r = post(server, "/v1/chat/completions", {**CHAT, "temperature": 0})
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length")


BAD_BODIES = [
    ("/v1/chat/completions", '{"model": "tiny-mistral", "messages": [', "json"),  # truncated JSON
    ("/v1/chat/completions", '[1, 2, 3]', None),  # not an object
    ("/v1/chat/completions", json.dumps({**CHAT, "messages": []}), "messages"),
    ("/v1/chat/completions", json.dumps({**CHAT, "messages": "hello"}), "messages"),
    ("/v1/chat/completions", json.dumps({**CHAT, "messages": [{"role": "wizard", "content": "x"}]}), None),
    ("/v1/chat/completions", json.dumps({**CHAT, "messages": [{"role": "user", "content": 5}]}), None),
    ("/v1/chat/completions", json.dumps({**CHAT, "messages": [{"role": "assistant", "content": "x"}]}), None),
    ("/v1/chat/completions", json.dumps({**CHAT, "max_tokens": "5"}), "max_tokens"),
    ("/v1/chat/completions", json.dumps({**CHAT, "max_tokens": -1}), "max_tokens"),
    ("/v1/chat/completions", json.dumps({**CHAT, "temperature": 3.0}), "temperature"),
    ("/v1/chat/completions", json.dumps({**CHAT, "top_p": 0}), "top_p"),
    ("/v1/chat/completions", json.dumps({**CHAT, "n": 0}), "n"),
    ("/v1/chat/completions", json.dumps({**CHAT, "stream": "yes"}), "stream"),
    ("/v1/chat/completions", json.dumps({**CHAT, "stream_options": {"include_usage": True}}), None),
    ("/v1/chat/completions", json.dumps({**CHAT, "top_logprobs": 5}), None),  # without logprobs
    ("/v1/chat/completions", json.dumps({**CHAT, "logprobs": True, "top_logprobs": 21}), "top_logprobs"),
    ("/v1/chat/completions", json.dumps({**CHAT, "presence_penalty": 9}), "presence_penalty"),
    ("/v1/chat/completions", json.dumps({**CHAT, "stop": ["a"] * 17}), "stop"),
    ("/v1/chat/completions", json.dumps({**CHAT, "tools": [{"type": "function"}]}), None),
    ("/v1/chat/completions", json.dumps({**CHAT, "response_format": {"type": "xml"}}), "response_format"),
    ("/v1/chat/completions", '{"model": "tiny-mistral", "messages": [{"role": "user", "content": "x"}], '
                             '"temperature": NaN}', "temperature"),
    ("/v1/chat/completions", '{"model": "tiny-mistral", "messages": [{"role": "user", "content": "x"}], '
                             '"top_p": Infinity}', "top_p"),
    ("/v1/completions", json.dumps({**COMPLETION, "prompt": []}), None),
    ("/v1/completions", json.dumps({**COMPLETION, "prompt": [1, -2]}), None),
    ("/v1/completions", json.dumps({**COMPLETION, "prompt": [1, 99999]}), None),  # outside the vocabulary
    ("/v1/completions", json.dumps({**COMPLETION, "prompt": [[1, 2], "mixed"]}), None),
    ("/v1/completions", json.dumps({**COMPLETION, "max_tokens": 0}), None),  # 0 only with echo
    ("/v1/completions", json.dumps({**COMPLETION, "logprobs": 30}), "logprobs"),
    ("/v1/completions", json.dumps({**COMPLETION, "suffix": "x"}), None),
    ("/v1/completions", json.dumps({**COMPLETION, "logit_bias": {"abc": 1}}), None),
    ("/v1/completions", json.dumps({**COMPLETION, "logit_bias": {"999999": 5}}), None),  # outside the vocabulary
    ("/v1/chat/completions", json.dumps({**CHAT, "logit_bias": {"32000": 5}}), None),  # one past the last id
    ("/v1/completions", json.dumps({**COMPLETION, "stop_token_ids": [5, 40000]}), None),
    ("/v1/completions", json.dumps({**COMPLETION, "seed": -1}), "seed"),
    ("/v1/completions", json.dumps({"model": MODEL}), "prompt"),
    ("/tokenize", json.dumps({"prompt": "x", "messages": [{"role": "user", "content": "y"}]}), None),
    ("/detokenize", json.dumps({"tokens": [1, 10**9]}), None),
]


@pytest.mark.parametrize("path,body,param", BAD_BODIES)
def test_bad_request_is_a_400_error_object(server, path, body, param):
    r = post(server, path, body, raw=True)
    err = assert_error(r, 400)
    assert err["type"] == "invalid_request_error"
    if param is not None and param != "json":
        assert err["param"] is not None and err["param"].startswith(param)


def test_context_overflow_is_a_400_that_names_the_lengths(server):
    too_long = "word " * 600  # over the 512-token context
    err = assert_error(post(server, "/v1/completions", {**COMPLETION, "prompt": too_long}), 400)
    assert "512" in err["message"]
    err = assert_error(post(server, "/v1/completions", {**COMPLETION, "prompt": [1] * 500, "max_tokens": 20}), 400)
    assert "512" in err["message"] and "500" in err["message"]
    r = post(server, "/v1/chat/completions", {**CHAT, "max_tokens": 600, "stream": True})
    assert_error(r, 400)  # refused before the stream starts: a plain 400, not an SSE event
    assert_still_serves(server)


def test_auth_model_route_method_and_size_errors(server):
    assert_error(post(server, "/v1/chat/completions", CHAT, headers={}), 401, code="invalid_api_key")
    assert_error(post(server, "/v1/chat/completions", CHAT, headers={**AUTH, "Authorization": "Bearer nope"}), 401)
    assert_error(post(server, "/tokenize", {"prompt": "x"}, headers={}), 401)
    assert httpx.get(server.url + "/health").status_code == 200  # public, as in vLLM
    assert_error(post(server, "/v1/chat/completions", {**CHAT, "model": "gpt-4"}), 404, param="model",
                 code="model_not_found")
    assert_error(httpx.get(server.url + "/v1/nothing-here", headers=AUTH), 404)
    assert_error(httpx.get(server.url + "/v1/chat/completions", headers=AUTH), 405)
    big = json.dumps({**COMPLETION, "prompt": "x" * (9 << 20)})
    assert_error(post(server, "/v1/completions", big, raw=True), 413)
    assert_still_serves(server)


def test_full_queue_is_a_429_and_the_server_recovers(tmp_path):
    """One running and one waiting fill a server of one sequence and a queue of one. The embedded model is
    slow enough on a CPU that the first request is still running when the third arrives."""
    s = start_server(smollm2_path(), str(tmp_path), "--max-num-seqs", "1", "--max-queue", "1")
    try:
        long = {"prompt": "Hi", "max_tokens": 200, "ignore_eos": True, "stream": True}
        with httpx.Client(timeout=60) as c1, httpx.Client(timeout=60) as c2:
            with c1.stream("POST", s.url + "/v1/completions", json=long) as first:
                lines = first.iter_lines()  # kept: dropping the iterator would close the connection
                next(lines)  # running
                with c2.stream("POST", s.url + "/v1/completions", json=long) as second:
                    assert second.status_code == 200  # waiting: the queue holds one
                    r = httpx.post(s.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, timeout=60)
                    assert_error(r, 429, code="queue_full")
                    assert r.headers["retry-after"] == "1"  # what clients back off by
        r = httpx.post(s.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, timeout=60)
        assert r.status_code == 200
    finally:
        s.stop()


def test_cors_is_off_unless_an_origin_is_given(server, tiny_model, tmp_path):
    preflight = {"Origin": "http://app.test", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}
    r = httpx.options(server.v1 + "/chat/completions", headers=preflight)
    assert "access-control-allow-origin" not in r.headers
    s = start_server(tiny_model, str(tmp_path), "--cors-origin", "http://app.test", "--max-model-len", "512")
    try:
        r = httpx.options(s.v1 + "/chat/completions", headers=preflight)
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://app.test"
        other = httpx.options(s.v1 + "/chat/completions", headers={**preflight, "Origin": "http://evil.test"})
        assert other.headers.get("access-control-allow-origin") != "http://evil.test"
    finally:
        s.stop()
