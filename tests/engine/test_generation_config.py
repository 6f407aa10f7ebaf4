"""A model's sampling defaults (engine/generation_config.py): its generation_config.json or GGUF general.sampling.*
keys, else llama.cpp's; used by LLM calls without params, `mistral7b chat` and the server's requests (their
server tests are in tests/server/test_openai_client.py)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from mistral7b import LLM, SamplingParams
from mistral7b.engine import generation_config
from mistral7b.engine.generation_config import LLAMA_CPP, sampling_defaults
from mistral7b.errors import CheckpointError
from mistral7b.loading import open_checkpoint
from tests.conftest import smollm2_path


def test_llama_cpp_defaults_where_the_checkpoint_says_nothing():
    assert (LLAMA_CPP.temperature, LLAMA_CPP.top_k, LLAMA_CPP.top_p, LLAMA_CPP.min_p) == (0.8, 40, 0.95, 0.05)
    assert sampling_defaults(open_checkpoint(smollm2_path())) == LLAMA_CPP  # the embedded GGUF has no keys


def test_generation_config_json_beside_the_weights(tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 1, "temperature": 0.6, "top_p": 0.9, "top_k": -1, "do_sample": True}))
    found = generation_config.from_folder(str(tmp_path))
    assert found.fields() == {"temperature": 0.6, "top_k": 0, "top_p": 0.9, "min_p": 0.0, "repetition_penalty": 1.0}
    assert found.source == "generation_config.json"
    (tmp_path / "generation_config.json").write_text(json.dumps({"max_new_tokens": 10}))
    assert generation_config.from_folder(str(tmp_path)) is None  # no sampling field: llama.cpp's apply


def test_gguf_sampling_keys():
    meta = {"general.sampling.temp": 0.3, "general.sampling.top_k": 20, "general.sampling.penalty_repeat": 1.1}
    found = generation_config.from_gguf(meta)
    assert (found.temperature, found.top_k, found.top_p, found.repetition_penalty) == (0.3, 20, 1.0, 1.1)
    assert generation_config.from_gguf({"general.name": "x"}) is None


@pytest.mark.parametrize("config", [{"temperature": "hot"}, {"top_p": 1.5}, {"temperature": -1},
                                    {"repetition_penalty": 0}])
def test_a_bad_value_is_one_clear_error(tmp_path, config):
    (tmp_path / "generation_config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="generation_config.json: "):
        generation_config.from_folder(str(tmp_path))
    (tmp_path / "generation_config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        generation_config.from_folder(str(tmp_path))


@pytest.fixture
def greedy_by_default(tiny_mistral_path, tmp_path):
    """The tiny Mistral checkpoint with a generation_config.json that asks for greedy decoding."""
    folder = tmp_path / "model"
    shutil.copytree(tiny_mistral_path, folder)
    (folder / "generation_config.json").write_text(json.dumps({"temperature": 0.0}))
    return str(folder)


def test_calls_without_params_take_the_model_defaults(greedy_by_default):
    llm = LLM(greedy_by_default, progress=False)
    assert llm.sampling_defaults.temperature == 0.0
    greedy = llm.generate("Hello there", SamplingParams(temperature=0, max_tokens=8))[0].outputs[0].token_ids
    assert llm.generate("Hello there")[0].outputs[0].token_ids[:8] == greedy
    messages = [{"role": "user", "content": "Hi"}]
    want = llm.chat(messages, SamplingParams(temperature=0, max_tokens=6)).outputs[0].token_ids
    assert llm.chat(messages, llm.default_sampling_params(max_tokens=6)).outputs[0].token_ids == want
    assert llm.default_sampling_params(temperature=1.0).temperature == 1.0  # what is given wins


def test_chat_command_takes_the_model_defaults(greedy_by_default):
    def chat(*extra):
        done = subprocess.run([sys.executable, "-m", "mistral7b", "chat", "--model", greedy_by_default, "--quiet",
                               "--message", "Hi", "--max-tokens", "6", *extra], capture_output=True, text=True,
                              timeout=300, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        assert done.returncode == 0, done.stderr
        return done.stdout

    assert chat() == chat("--temperature", "0")  # the model's temperature 0: greedy, twice the same
    done = subprocess.run([sys.executable, "-m", "mistral7b", "chat", "--help"], capture_output=True, text=True)
    assert "llama.cpp's (temperature 0.8, top-k 40, top-p 0.95" in " ".join(done.stdout.split())
