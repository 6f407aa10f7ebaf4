"""The OpenAI-compatible server: `mistral7b serve` (FastAPI + uvicorn) over the one generation engine.

Where a request goes: app.py (routes, auth, limits) -> completions.py / chat.py (OpenAI shapes, SSE) ->
async_engine.py (the engine thread) -> engine/llm_engine.py (scheduler, paged KV cache, model).
"""
