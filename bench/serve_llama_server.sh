#!/usr/bin/env bash
# Start llama.cpp's own C++ server (`llama-server`: parallel slots, continuous batching) on the embedded
# SmolLM2 GGUF: the batching peer for bench/serve.py, beside llama-cpp-python's one-at-a-time server
# (bench/serve_peer.sh).
#
# Build it once from the llama.cpp sources that llama-cpp-python 0.3.36's sdist vendors (about 8 minutes on 2
# cores; the same CMAKE flags as the CPU section: the native build with AMX crashed on the dev machine):
#   pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 && tar xzf llama_cpp_python-0.3.36.tar.gz
#   cmake -S llama_cpp_python-0.3.36/vendor/llama.cpp -B /tmp/llama-server-build -DCMAKE_BUILD_TYPE=Release \
#     -DGGML_NATIVE=OFF -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AMX_TILE=OFF \
#     -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF -DLLAMA_BUILD_SERVER=ON -DLLAMA_CURL=OFF
#   cmake --build /tmp/llama-server-build --target llama-server -j2
#
# Usage: bash bench/serve_llama_server.sh [PORT] [SLOTS]   (default 8002, 16 slots of 512 tokens each)
set -euo pipefail
PORT="${1:-8002}"
SLOTS="${2:-16}"
BIN="${LLAMA_SERVER:-/tmp/llama-server-build/bin/llama-server}"
HERE="$(cd "$(dirname "$0")/.." && pwd)"
MODEL="${MODEL:-$("$HERE/.venv/bin/python" -c 'from mistral7b.default_model import default_model_path as p; print(p())')}"
exec "$BIN" -m "$MODEL" --host 127.0.0.1 --port "$PORT" -t "${THREADS:-2}" -tb "${THREADS:-2}" -fa on \
  -c $((SLOTS * 512)) --parallel "$SLOTS" --cont-batching --no-webui --log-disable
