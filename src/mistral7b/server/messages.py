"""What crosses between the API server's process and the engine's (server/runner.py): one dataclass per message.

API -> engine: `AddRequest`, `AbortRequest`, `Call` (a named operation that needs the model, such as moderation),
`Shutdown`. Engine -> API: `StepOutput` (one step's events and the engine's state after it), `RequestFailed`,
`CallResult`, `EngineDied`. They travel pickled over a local socket pair between the two processes of one server
(multiprocessing's Connection); nothing from outside is ever unpickled.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mistral7b.engine.outputs import EngineStats, StreamEvent
from mistral7b.engine.sampling_params import SamplingParams
from mistral7b.server.errors import APIError, as_api_error


@dataclass(frozen=True)
class ErrorInfo:
    """An APIError's fields: exceptions are rebuilt on the API side rather than pickled (their constructors
    differ from their fields)."""

    status: int
    message: str
    type: str
    param: str | None = None
    code: str | None = None

    @classmethod
    def of(cls, e: BaseException) -> ErrorInfo:
        api = as_api_error(e)  # an unexpected exception is logged here, in the engine's process
        return cls(api.status, api.message, api.type, api.param, api.code)

    def error(self) -> APIError:
        return APIError(self.status, self.message, self.type, self.param, self.code)


# ---- API -> engine ------------------------------------------------------------------------------------------
@dataclass
class AddRequest:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    arrival: float  # time.monotonic() when the API received it (one clock for both processes)


@dataclass
class AbortRequest:
    request_id: str


@dataclass
class Call:
    """Run the engine process's operation `op` (server/runner.py's `core_operations`) between two steps."""

    call_id: int
    op: str
    args: tuple[Any, ...]


@dataclass
class Shutdown:
    pass


# ---- engine -> API ------------------------------------------------------------------------------------------
@dataclass
class StepOutput:
    events: list[StreamEvent]
    stats: EngineStats


@dataclass
class RequestFailed:
    request_id: str
    error: ErrorInfo


@dataclass
class CallResult:
    call_id: int
    value: Any = None
    error: ErrorInfo | None = None


@dataclass
class EngineDied:
    """The engine failed (the reason is in the engine process's log); every request gets a 503."""
