"""The OpenAI-compatible server: `mistral7b serve` (FastAPI + uvicorn) over the one generation engine, in two
processes (runner.py): HTTP and tokenizing in one, the engine in the other.

Where a request goes: app.py (routes, auth, limits) -> completions.py / chat.py (OpenAI shapes, SSE) ->
async_engine.py (per-request streams) ~> messages.py over a socket pair ~> engine_core.py (the engine's loop) ->
engine/llm_engine.py (scheduler, paged KV cache, model).
"""
