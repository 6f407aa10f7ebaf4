"""`mistral7b serve`: the OpenAI-compatible server (FastAPI + uvicorn) with continuous batching.

    mistral7b serve                                  # the embedded model on http://127.0.0.1:8000
    mistral7b serve --model ./Mistral-7B-Instruct-v0.1 --api-key "$KEY" --port 8080
    mistral7b serve --moderate input,output --safe-prompt

Binds 127.0.0.1 unless --host says otherwise. The API key may also come from MISTRAL7B_API_KEY. SIGINT or
SIGTERM stops accepting requests, lets running ones finish for --shutdown-timeout seconds, then cancels them.
"""

from __future__ import annotations

import argparse
import os

from mistral7b.errors import RequestError


def register(sub: argparse._SubParsersAction) -> None:
    from mistral7b.commands.options import add_model_options, add_parallel_option
    from mistral7b.moderation.chat import add_chat_options

    p = sub.add_parser("serve", help="serve the model over an OpenAI-compatible HTTP API, with a chat page at /")
    add_model_options(p)
    add_parallel_option(p)
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--api-key", default=os.environ.get("MISTRAL7B_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 and tokenizer routes (env MISTRAL7B_API_KEY)")
    g.add_argument("--served-model-name", help="the model id clients send (default: the checkpoint's name)")
    g.add_argument("--cors-origin", action="append", default=[], help="allow this browser origin (repeatable)")
    g.add_argument("--max-queue", type=int, default=256, help="requests allowed to wait; beyond, 429")
    g.add_argument("--max-body-mb", type=float, default=8.0, help="largest request body in MiB")
    g.add_argument("--max-logprobs", type=int, default=20)
    g.add_argument("--shutdown-timeout", type=float, default=10.0)
    g.add_argument("--safe-prompt", action="store_true", help="prepend the guardrail prompt to every chat")
    g.add_argument("--generation-config", choices=["auto", "none"], default="auto",
                   help="sampling for the fields a request leaves out (temperature, top_p, top_k, min_p, "
                        "repetition_penalty): auto = the model's own (generation_config.json or GGUF "
                        "general.sampling.*), else llama.cpp's (0.8, 0.95, 40, 0.05, 1); none = OpenAI's "
                        "(temperature 1, no filters)")
    g.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    e = p.add_argument_group("engine")
    e.add_argument("--max-num-seqs", type=int, default=64, help="sequences in the running batch at most")
    e.add_argument("--max-num-batched-tokens", type=int, default=None, help="token budget of one step")
    e.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's)")
    e.add_argument("--block-size", type=int, default=16, help="tokens per KV cache block")
    e.add_argument("--kv-cache-memory", type=float, default=None,
                   help="GiB for the KV cache (default 1 on CPU; on a GPU, what --gpu-memory-utilization leaves)")
    e.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                   help="share of the GPU's whole memory for the weights, a step's activations and the KV cache "
                   "(as vLLM's; the cache gets what is left after a step is measured)")
    e.add_argument("--no-prefix-caching", action="store_true", help="do not reuse cached prompt prefixes")
    e.add_argument("--no-cuda-graphs", action="store_true", help="GPU: launch decode steps kernel by kernel")
    e.add_argument("--no-async-scheduling", action="store_true", help="GPU: read each greedy decode step back "
                   "before launching the next (default: the next is launched first, overlapping the host's work)")
    add_chat_options(p)
    p.set_defaults(func=run)


def _positive(name: str, value: float | None) -> None:
    if value is not None and value <= 0:
        raise RequestError(f"--{name} must be positive, got {value}")


def run(a: argparse.Namespace) -> int:
    from mistral7b.commands.options import build_llm
    from mistral7b.engine.generation_config import NEUTRAL
    from mistral7b.moderation.chat import chat_guard
    from mistral7b.server.runner import ApiServerSpec, core_operations, serve

    if not 0 <= a.port <= 65535:
        raise RequestError(f"--port must be in [0, 65535], got {a.port}")
    for name in ("max_queue", "max_body_mb", "max_num_seqs", "max_num_batched_tokens", "max_model_len",
                 "block_size", "kv_cache_memory", "shutdown_timeout"):
        _positive(name.replace("_", "-"), getattr(a, name))
    if not 0 < a.gpu_memory_utilization <= 1:
        raise RequestError(f"--gpu-memory-utilization must be in (0, 1], got {a.gpu_memory_utilization}")
    if not 0 <= a.max_logprobs <= 20:
        raise RequestError(f"--max-logprobs must be in [0, 20], got {a.max_logprobs}")
    make_guard = chat_guard(a)
    options = {"block_size": a.block_size, "max_num_batched_tokens": a.max_num_batched_tokens,
               "enable_prefix_caching": not a.no_prefix_caching, "cuda_graphs": not a.no_cuda_graphs,
               "async_scheduling": False if a.no_async_scheduling else None,
               "gpu_memory_utilization": a.gpu_memory_utilization}
    if a.kv_cache_memory is not None:
        options["kv_cache_memory"] = int(a.kv_cache_memory * (1 << 30))
    llm = build_llm(a, max_batch_size=a.max_num_seqs, max_model_len=a.max_model_len, engine_options=options)
    name = a.served_model_name or _model_name(llm.model_path)
    guard = make_guard(llm) if make_guard else None
    spec = ApiServerSpec(
        model_path=llm.model_path, limits=llm.engine.limits, served_name=name, host=a.host, port=a.port,
        log_level=a.log_level, shutdown_timeout=a.shutdown_timeout, api_key=a.api_key or None,
        cors_origins=a.cors_origin, max_body_bytes=int(a.max_body_mb * (1 << 20)), max_queue=a.max_queue,
        max_logprobs=a.max_logprobs, safe_prompt=a.safe_prompt,
        sampling_defaults=llm.sampling_defaults if a.generation_config == "auto" else NEUTRAL,
        moderate_input=guard is not None and guard.input, moderate_output=guard is not None and guard.output)
    serve(llm, spec, core_operations(llm, guard, name))
    return 0


def _model_name(path: str) -> str:
    base = os.path.basename(os.path.normpath(path))
    return base[:-5] if base.endswith(".gguf") else base
