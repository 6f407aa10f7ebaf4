"""`mistral7b eval suite`: the paper's tasks, a clear message offline, and a real run on a local task."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from lm_eval.tasks import TaskManager

from mistral7b.eval import suite
from mistral7b.eval.lm_eval_model import Mistral7BLM
from tests.eval.conftest import hf_logprob, write_task


def run(*args: str, home: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_HOME=home, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "mistral7b", "eval", "suite", *args], capture_output=True,
                          text=True, timeout=300, env=env)


def test_the_paper_table_is_complete():
    names = [t.name for t in suite.PAPER_TASKS]
    assert names == ["MMLU", "HellaSwag", "WinoGrande", "PIQA", "ARC-e", "ARC-c", "NaturalQuestions", "TriviaQA",
                     "HumanEval", "MBPP", "MATH", "GSM8K"]
    shots = {t.name: t.shots for t in suite.PAPER_TASKS}
    assert shots["MMLU"] == 5 and shots["TriviaQA"] == 5 and shots["MBPP"] == 3 and shots["MATH"] == 4
    assert shots["GSM8K"] == 8 and shots["HumanEval"] == 0 and shots["HellaSwag"] == 0


def test_every_task_is_known_to_lm_eval():
    """Each row names a task lm-eval has, reading the dataset the row says it needs."""
    tm = TaskManager()
    for t in suite.PAPER_TASKS:
        name = t.task["task"] if isinstance(t.task, dict) else t.task
        assert name in tm.all_tasks, name


def test_offline_without_datasets_names_what_is_missing(tmp_path):
    p = run("--quiet", home=str(tmp_path))
    assert p.returncode == 1
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and "Traceback" not in p.stderr
    for repo in ("cais/mmlu", "Rowan/hellaswag", "openai/gsm8k", "EleutherAI/hendrycks_math"):
        assert repo in last
    p = run("--list", home=str(tmp_path))
    assert p.returncode == 0 and "missing dataset cais/mmlu" in p.stdout and "60.1" in p.stdout


def test_a_cached_dataset_makes_its_task_runnable(tmp_path):
    (tmp_path / "hub" / "datasets--cais--mmlu").mkdir(parents=True)
    (tmp_path / "datasets" / "openai___openai_humaneval").mkdir(parents=True)
    dirs = [str(tmp_path / "hub"), str(tmp_path / "datasets")]
    todo = suite.plan(suite.select(["mmlu", "HumanEval", "GSM8K"]), allow_code=False, cache_dirs=dirs)
    assert [t.name for t in todo.runnable] == ["MMLU"]
    assert {r.task.name: r.status for r in todo.skipped} == {
        "HumanEval": "runs generated code: pass --allow-code-execution",
        "GSM8K": "missing dataset openai/gsm8k"}
    assert [t.name for t in suite.plan(suite.select(["HumanEval"]), True, dirs).runnable] == ["HumanEval"]


def test_unknown_task_is_one_clear_line(tmp_path):
    p = run("--tasks", "MMLU,BogusBench", home=str(tmp_path))
    assert p.returncode == 1 and "BogusBench" in p.stderr.strip().splitlines()[-1]
    assert "Traceback" not in p.stderr


def test_suite_runs_a_local_task_and_prints_it_beside_the_paper(tiny_mistral, tmp_path):
    hf, folder = tiny_mistral
    rows = [{"question": q, "choices": c, "label": y} for q, c, y in [
        ("Paris is in", ["France", "Spain"], 0), ("Ice is", ["hot", "cold"], 1),
        ("One, two,", ["three", "seven"], 0), ("The sun rises in the", ["west", "east"], 1)]]
    config = ("output_type: multiple_choice\ndoc_to_text: \"{{question}}\"\ndoc_to_choice: \"{{choices}}\"\n"
              "doc_to_target: label\nmetric_list:\n  - metric: acc\n")
    tm = TaskManager(include_path=write_task(tmp_path, "local_suite_mc", rows, config), include_defaults=False)
    task = suite.SuiteTask("Local MC", "local_suite_mc", 0, "acc,none", 42.0, (), "0-shot")
    lm = Mistral7BLM(model=folder, dtype="float32")
    (row,) = suite.run_suite(lm, [task], task_manager=tm)
    tok = lm.tokenizer
    right = 0
    for r in rows:  # lm-eval joins question and choice with its target_delimiter, one space
        ctx = tok.encode(r["question"], add_bos=True)
        scores = [hf_logprob(hf, ctx, tok.encode(r["question"] + " " + c, add_bos=True)[len(ctx):])[0]
                  for c in r["choices"]]
        right += int(scores.index(max(scores)) == r["label"])
    assert row.score == pytest.approx(100.0 * right / len(rows))
    text = suite.table([row])
    assert f"{row.score:.1f}" in text and "42.0" in text and "Local MC" in text
    (broken,) = suite.run_suite(lm, [suite.SuiteTask("Nope", "no_such_task_here", 0, "acc,none", 1.0, ())],
                                task_manager=tm)
    assert broken.score is None and broken.status.startswith("failed:")
