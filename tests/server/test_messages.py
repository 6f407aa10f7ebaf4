"""What crosses between the server's two processes survives the trip unchanged: every message kind, with the
fields a step's events can carry, pickled as the connection pickles them."""

from __future__ import annotations

import pickle

from mistral7b.engine.outputs import EngineStats, StreamEvent
from mistral7b.engine.sampling_params import SamplingParams
from mistral7b.server.errors import APIError
from mistral7b.server.messages import (AbortRequest, AddRequest, Call, CallResult, EngineDied, ErrorInfo,
                                       RequestFailed, Shutdown, StepOutput)
from mistral7b.errors import RequestError


def trip(message):
    return pickle.loads(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))


def test_every_message_round_trips():
    full = StreamEvent("r1", 17, " word", -0.25, None, 1, [(17, -0.25), (3, -2.0)], [None, (-1.5, [(4, -0.5)])],
                       [None, 2], 5)
    final = StreamEvent("r2", None, "tail", None, "stop", 0)
    params = SamplingParams(max_tokens=7, temperature=0.7, top_p=0.9, seed=3, logit_bias={5: 1.5}, stop=["\n"])
    messages = [AddRequest("r1", [1, 2, 3], params, 12.5), AbortRequest("r1"), Call(4, "moderate", ({"input": "x"},)),
                Shutdown(), StepOutput([full, final], EngineStats(2, 0.25, 1, 30, 12)),
                RequestFailed("r3", ErrorInfo(400, "bad", "invalid_request_error", "prompt")),
                CallResult(4, {"results": []}), CallResult(5, error=ErrorInfo(500, "no", "server_error")),
                EngineDied()]
    for message in messages:
        assert trip(message) == message, message


def test_errors_are_rebuilt_as_the_api_errors_they_were():
    refused = ErrorInfo.of(RequestError("the prompt is empty")).error()
    assert isinstance(refused, APIError) and (refused.status, refused.message) == (400, "the prompt is empty")
    busy = trip(ErrorInfo.of(APIError(429, "busy", "rate_limit_error", code="queue_full"))).error()
    assert (busy.status, busy.type, busy.code) == (429, "rate_limit_error", "queue_full")
    hidden = ErrorInfo.of(ValueError("a detail that must not reach a client"))
    assert (hidden.status, hidden.message) == (500, "internal server error")
