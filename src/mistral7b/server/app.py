"""The FastAPI application: OpenAI routes, tokenizer and health routes, metrics, the web chat page.

Safe by default: the CLI binds 127.0.0.1; with an API key every /v1 route and the tokenizer routes need
`Authorization: Bearer KEY` (health, metrics and the page stay public, as in vLLM); CORS is off unless origins
are given; request bodies are capped; there are no docs pages that would pull scripts from a CDN.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, Response

from mistral7b.engine.processor import check_token_ids
from mistral7b.errors import RequestError
from mistral7b.server.chat import create_chat_completion
from mistral7b.server.completions import create_completion
from mistral7b.server.errors import APIError, install_error_handlers
from mistral7b.server.protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from mistral7b.server.state import ServerState

GUARDED = ("/v1/", "/tokenize", "/detokenize", "/tokenizer_info")
DEFAULT_MAX_BODY = 8 << 20


class BodyLimit:
    """ASGI middleware: refuse request bodies over `limit` bytes (declared or streamed) with a 413."""

    def __init__(self, app: Any, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await APIError(413, f"the request body is over {self.limit} bytes").response()(scope, receive, send)
            return
        seen = 0

        async def limited() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise APIError(413, f"the request body is over {self.limit} bytes")
            return message

        await self.app(scope, limited, send)


class ApiKey:
    """ASGI middleware: the guarded routes need `Authorization: Bearer KEY` (or `X-Api-Key: KEY`)."""

    def __init__(self, app: Any, key: str):
        self.app, self.key = app, key.encode()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"].startswith(GUARDED) and scope["method"] != "OPTIONS":
            headers = {k.decode("latin-1").lower(): v for k, v in scope.get("headers") or []}
            given = headers.get("authorization", b"")
            token = given[7:] if given[:7].lower() == b"bearer " else headers.get("x-api-key", b"")
            if not hmac.compare_digest(token, self.key):
                error = APIError(401, "invalid or missing API key", "authentication_error", code="invalid_api_key")
                await error.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _page() -> str:
    return resources.files("mistral7b.server").joinpath("static/index.html").read_text(encoding="utf-8")


def build_app(state: ServerState, cors_origins: list[str] | None = None,
              max_body_bytes: int = DEFAULT_MAX_BODY) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.engine.attach(asyncio.get_running_loop())
        yield
        state.engine.stop()

    app = FastAPI(title="mistral7b", lifespan=lifespan, docs_url=None, redoc_url=None)
    install_error_handlers(app)
    page = _page()
    created = int(time.time())

    if state.api_key:
        app.add_middleware(ApiKey, key=state.api_key)
    if cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=cors_origins, allow_credentials=True,
                           allow_methods=["GET", "POST"], allow_headers=["*"])
    app.add_middleware(BodyLimit, limit=max_body_bytes)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/health")
    async def health() -> Response:
        if not state.engine.alive:
            return APIError(503, "the engine is not running", "unavailable_error", code="engine_dead").response()
        return JSONResponse({"status": "ok"})

    def card() -> dict[str, Any]:
        return {"id": state.served_name, "object": "model", "created": created, "owned_by": "mistral7b",
                "root": state.served_name, "parent": None, "max_model_len": state.max_model_len}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [card()]}

    @app.get("/v1/models/{model:path}")
    async def model(model: str) -> dict[str, Any]:
        """One model's card (what the OpenAI client's models.retrieve reads); 404 for any other name."""
        state.check_model(model)
        return card()

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Any:
        return await create_completion(body, request, state)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        return await create_chat_completion(body, request, state)

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict[str, Any]:
        state.check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise RequestError("give exactly one of prompt or messages")
        if body.prompt is not None:
            tokenizer = state.processor.tokenizer
            if tokenizer is None:
                raise RequestError("this model has no tokenizer")
            special = state.special_tokens()
            if not body.add_special_tokens and body.prompt in special:
                # A prompt that is exactly a special token's text names that token: how lm-eval's remote
                # tokenizer finds the BOS and EOS ids. Anywhere else such text stays text.
                ids = [special[body.prompt]]
            else:
                ids = tokenizer.encode(body.prompt, add_bos=body.add_special_tokens and tokenizer.add_bos)
        else:
            ids = await state.encode_chat([m.plain() for m in body.messages], body.safe_prompt)
        return {"tokens": ids, "count": len(ids), "max_model_len": state.max_model_len}

    @app.get("/tokenizer_info")
    async def tokenizer_info() -> dict[str, Any]:
        """What lm-evaluation-harness's remote tokenizer asks for (vLLM's endpoint)."""
        tokenizer = state.processor.tokenizer
        if tokenizer is None:
            raise RequestError("this model has no tokenizer")
        names = {v: k for k, v in state.special_tokens().items()}
        return {"eos_token": names.get(tokenizer.eos_id), "bos_token": names.get(tokenizer.bos_id),
                "pad_token": None, "add_bos_token": tokenizer.add_bos, "model_max_length": state.max_model_len}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict[str, Any]:
        state.check_model(body.model)
        tokenizer = state.processor.tokenizer
        if tokenizer is None:
            raise RequestError("this model has no tokenizer")
        check_token_ids(body.tokens, state.processor.vocab_size)
        return {"prompt": tokenizer.decode(body.tokens, skip_special_tokens=body.skip_special_tokens)}

    @app.post("/v1/moderations")
    async def moderations(request: Request) -> dict[str, Any]:
        """OpenAI's moderation endpoint, answered by the model itself (self-reflection, moderation/)."""
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON ({e})") from None
        if isinstance(body, dict):
            state.check_model(body.get("model") if isinstance(body.get("model"), str) else None)
        return await state.engine.call("moderate", body)

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return app
