"""lm-eval runs our model on local tasks; every score equals what transformers' forward pass gives.

Multiple choice (acc), generation with exact match, and perplexity (loglikelihood_rolling), each through
lm-eval's own `simple_evaluate`, plus the command-line entry points and chat prompts.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import lm_eval
import pytest
import torch
from lm_eval.api.instance import Instance
from lm_eval.api.registry import get_model
from lm_eval.tasks import TaskManager
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from mistral7b.eval.lm_eval_model import Mistral7BLM
from tests.eval.conftest import hf_logprob, write_task

MC_CONFIG = """output_type: multiple_choice
doc_to_text: "{{question}}"
doc_to_choice: "{{choices}}"
doc_to_target: label
metric_list:
  - metric: acc
"""

GEN_CONFIG = """output_type: generate_until
doc_to_text: "{{question}}"
doc_to_target: "{{answer}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 6
  do_sample: false
metric_list:
  - metric: exact_match
"""

PPL_CONFIG = """output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
"""

QUESTIONS = [
    ("The capital of France is", [" Paris", " London", " Rome"], 0),
    ("Two plus two equals", [" three", " four", " five", " twenty-two"], 1),
    ("The sky on a clear day is", [" green", " blue"], 1),
    ("Water freezes at zero degrees", [" Celsius", " Fahrenheit", " Kelvin"], 0),
    ("Question: which animal barks?\nAnswer:", [" a dog", " a cat", " a fish"], 0),
    ("", [" Hello", " Goodbye"], 0),  # an empty context: BOS alone conditions the choice
]


@pytest.fixture(scope="module")
def lm(tiny_mistral):
    return Mistral7BLM(model=tiny_mistral[1], dtype="float32", batch_size=3, chunk_size=5)


def evaluate(lm, folder: str, task: str, **kw):
    return lm_eval.simple_evaluate(model=lm, tasks=[task], task_manager=TaskManager(include_path=folder,
                                   include_defaults=False), bootstrap_iters=0, log_samples=True, **kw)


def test_registered_under_our_name():
    assert get_model("mistral7b") is Mistral7BLM


def test_multiple_choice_scores_equal_direct_forward(lm, tiny_mistral, tmp_path):
    hf, _ = tiny_mistral
    rows = [{"question": q, "choices": c, "label": y} for q, c, y in QUESTIONS]
    out = evaluate(lm, write_task(tmp_path, "local_mc", rows, MC_CONFIG), "local_mc")
    tok = lm.tokenizer
    correct = 0
    for sample in out["samples"]["local_mc"]:
        want = []
        for (context, choice), resp in zip(sample["arguments"], sample["resps"]):
            ctx = tok.encode(context, add_bos=True) if context else [tok.bos_id]
            whole = tok.encode(context + choice, add_bos=True)
            cont = whole[len(ctx):] if context else tok.encode(choice, add_bos=False)
            logprob, greedy = hf_logprob(hf, ctx, cont)
            assert resp[0][0] == pytest.approx(logprob, abs=1e-3)
            assert resp[0][1] == greedy
            want.append(logprob)
        correct += int(max(range(len(want)), key=want.__getitem__) == sample["doc"]["label"])
    assert out["results"]["local_mc"]["acc,none"] == pytest.approx(correct / len(QUESTIONS))


def test_generation_exact_match_equals_transformers_greedy(lm, tiny_mistral, tmp_path):
    hf, _ = tiny_mistral
    tok = lm.tokenizer
    rows, expected = [], 0
    for i, q in enumerate(["Once upon a time", "The quick brown fox", "In 1492, Columbus", "def add(a, b):",
                           "Roses are red,", "My favourite colour is"]):
        ids = tok.encode(q, add_bos=True)
        with torch.no_grad():
            new = hf.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False)[0, len(ids):].tolist()
        text = tok.decode(new).split("\n")[0]
        # Half the answers are the greedy text (exact match), half differ from it by one character.
        answer = text if i % 2 == 0 else text + "x"
        expected += int(i % 2 == 0)
        rows.append({"question": q, "answer": answer})
    assert all(r["answer"].strip() for r in rows[0::2])  # a match of empty strings would prove nothing
    out = evaluate(lm, write_task(tmp_path, "local_gen", rows, GEN_CONFIG), "local_gen")
    got = [s["resps"][0][0] for s in out["samples"]["local_gen"]]
    assert got[0::2] == [r["answer"] for r in rows[0::2]]
    assert out["results"]["local_gen"]["exact_match,none"] == pytest.approx(expected / len(rows))


def test_rolling_perplexity_equals_direct_forward(tiny_mistral, tmp_path):
    hf, folder = tiny_mistral
    lm = Mistral7BLM(model=folder, dtype="float32", max_length=16, chunk_size=6)
    texts = ["The rolling buffer cache keeps the last W keys and values of every layer.",
             "Short.", "Sliding window attention lets each token attend to at most W tokens before it."]
    out = evaluate(lm, write_task(tmp_path, "local_ppl", [{"text": t} for t in texts], PPL_CONFIG), "local_ppl")
    total, n_bytes = 0.0, 0
    for t in texts:
        ids = lm.tokenizer.encode(t, add_bos=False)
        windows = [make_disjoint_window(w) for w in get_rolling_token_windows(ids, lm.tokenizer.bos_id, 16, 1)]
        assert len(windows) > 1 or len(ids) <= 16
        total += sum(hf_logprob(hf, list(c), list(k))[0] for c, k in windows)
        n_bytes += len(t.encode("utf-8"))
    result = out["results"]["local_ppl"]
    assert result["bits_per_byte,none"] == pytest.approx(-total / n_bytes / math.log(2), rel=1e-5)
    assert result["byte_perplexity,none"] == pytest.approx(math.exp(-total / n_bytes), rel=1e-5)


def test_chat_prompt_keeps_its_special_tokens(lm, tiny_mistral):
    hf, _ = tiny_mistral
    messages = [{"role": "user", "content": "Name the capital of France."}]
    prompt = lm.apply_chat_template(messages)
    ids = lm.tokenizer.encode_chat(messages, add_generation_prompt=True)
    assert lm.tok_encode(prompt, add_special_tokens=False) != ids  # as plain text the [INST] ids are lost...
    (got,) = lm.loglikelihood([Instance("loglikelihood", {}, (prompt, " Paris"), 0)], disable_tqdm=True)
    want, _ = hf_logprob(hf, ids, lm.tokenizer.encode(" Paris", add_bos=False))
    assert got[0] == pytest.approx(want, abs=1e-3)  # ...but the request is scored on the chat's exact ids


def test_lm_eval_command_line_with_our_model(tiny_mistral, tmp_path):
    _, folder = tiny_mistral
    rows = [{"question": q, "choices": c, "label": y} for q, c, y in QUESTIONS]
    tasks = write_task(tmp_path / "tasks", "local_mc_cli", rows, MC_CONFIG)
    direct = evaluate(Mistral7BLM(model=folder, dtype="float32"), tasks, "local_mc_cli")
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    p = subprocess.run([sys.executable, "-m", "mistral7b", "eval", "lm-eval", "run", "--model", "mistral7b",
                        "--model_args",
                        f"model={folder},dtype=float32", "--tasks", "local_mc_cli", "--include_path", tasks,
                        "--output_path", str(tmp_path / "out")], capture_output=True, text=True, timeout=300,
                       env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    (result_file,) = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path / "out") for f in fs
                      if f.startswith("results")]
    with open(result_file) as f:
        result = json.load(f)["results"]["local_mc_cli"]
    assert result["acc,none"] == pytest.approx(direct["results"]["local_mc_cli"]["acc,none"])


@pytest.mark.parametrize(
    "args,needle",
    [
        (["-m", "mistral7b.eval", "run", "--model", "mistral7b", "--model_args", "model=/nonexistent/ckpt",
          "--tasks", "hellaswag"], "/nonexistent/ckpt"),
        (["-m", "mistral7b", "eval", "lm-eval", "run", "--model", "mistral7b", "--tasks", "no_such_task_x"],
         "no_such_task_x"),
    ],
)
def test_lm_eval_errors_are_one_line(args, needle):
    p = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"})
    assert p.returncode == 1
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and needle in last, p.stderr[-2000:]
    assert "Traceback" not in p.stderr
