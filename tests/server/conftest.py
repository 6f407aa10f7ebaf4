"""A real `mistral7b serve` process on a free loopback port, over a tiny random Mistral checkpoint that carries
Mistral's real v1 tokenizer and a short window (W = 16), and the offline `LLM` on the same checkpoint: the
oracle every served answer is compared with.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from mistral7b.config import ModelArgs
from tests.conftest import write_tiny_mistral

W = 16
ARGS = ModelArgs(dim=64, n_layers=2, head_dim=16, hidden_dim=96, n_heads=4, n_kv_heads=2, norm_eps=1e-5,
                 vocab_size=32000, rope_theta=10000.0, sliding_window=W, max_seq_len=512)
API_KEY = "test-key-123"
MODEL = "tiny-mistral"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    process: subprocess.Popen
    url: str
    log: str

    @property
    def v1(self) -> str:
        return self.url + "/v1"

    def client(self, **kw):
        import openai

        return openai.OpenAI(base_url=self.v1, api_key=kw.pop("api_key", API_KEY), max_retries=0, **kw)

    def async_client(self, **kw):
        import openai

        return openai.AsyncOpenAI(base_url=self.v1, api_key=kw.pop("api_key", API_KEY), max_retries=0, **kw)

    def metrics(self) -> dict[str, float]:
        """The samples of /metrics whose one label is the served model_name (every metric has it), by name."""
        import re

        text = httpx.get(self.url + "/metrics", timeout=10).text
        out = {}
        for line in text.splitlines():
            match = re.fullmatch(r'([^{\s]+)\{model_name="[^"]+"\} (\S+)', line)
            if match:
                out[match[1]] = float(match[2])
        return out

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def start_server(model: str, tmp: str, *extra: str, timeout: float = 120) -> Server:
    port = free_port()
    log = os.path.join(tmp, f"server-{port}.log")
    with open(log, "w") as f:
        process = subprocess.Popen(
            [sys.executable, "-m", "mistral7b", "serve", "--model", model, "--port", str(port), "--quiet",
             "--log-level", "warning", *extra],
            stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    server = Server(process, f"http://127.0.0.1:{port}", log)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}:\n{open(log).read()}")
        try:
            if httpx.get(server.url + "/health", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    server.stop()
    raise RuntimeError(f"the server did not come up in {timeout} s:\n{open(log).read()}")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    return write_tiny_mistral(str(tmp_path_factory.mktemp("served_mistral")), ARGS, seed=7)


@pytest.fixture(scope="session")
def server(tiny_model, tmp_path_factory) -> Iterator[Server]:
    s = start_server(tiny_model, str(tmp_path_factory.mktemp("logs")), "--api-key", API_KEY,
                     "--served-model-name", MODEL, "--chunk-size", "24", "--block-size", "4",
                     "--max-num-batched-tokens", "64", "--max-model-len", str(ARGS.max_seq_len))
    yield s
    s.stop()


@pytest.fixture(scope="session")
def offline(tiny_model):
    """The same checkpoint through the offline API: what every served answer must equal."""
    from mistral7b import LLM

    return LLM(tiny_model, progress=False, max_model_len=ARGS.max_seq_len)


V3_ARGS = ModelArgs(dim=64, n_layers=2, head_dim=16, hidden_dim=96, n_heads=4, n_kv_heads=2, norm_eps=1e-5,
                    vocab_size=32768, rope_theta=10000.0, sliding_window=None, max_seq_len=1024)


def v3_tokenizer() -> str:
    """Mistral's v3 tokenizer (tools: [AVAILABLE_TOOLS], [TOOL_CALLS], [TOOL_RESULTS]), from mistral-common."""
    import mistral_common

    return os.path.join(os.path.dirname(mistral_common.__file__), "data", "mistral_instruct_tokenizer_240323.model.v3")


@pytest.fixture(scope="session")
def v3_folder(tmp_path_factory) -> str:
    """A tiny random checkpoint with the v3 tokenizer beside it."""
    import shutil

    from mistral7b.loading.writers import save_native
    from tests.loading.conftest import random_state

    folder = str(tmp_path_factory.mktemp("tiny_v3"))
    save_native(folder, V3_ARGS, random_state(V3_ARGS, seed=4))
    shutil.copy(v3_tokenizer(), os.path.join(folder, "tokenizer.model.v3"))
    return folder


@pytest.fixture(scope="session")
def v3_server(v3_folder, tmp_path_factory) -> Iterator[Server]:
    s = start_server(v3_folder, str(tmp_path_factory.mktemp("logs")), "--served-model-name", "tiny-v3",
                     "--max-model-len", "1024")
    yield s
    s.stop()
