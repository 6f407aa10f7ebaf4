"""`chat --moderate`: a flagged prompt is refused and a flagged answer withheld, naming the category.

The tiny random model's own classification decides what must happen; the test then filters exactly that
category (the exchange must be blocked) or every other one (it must go through unchanged).
"""

from __future__ import annotations

import pytest

from mistral7b import SamplingParams
from mistral7b.cli import main
from mistral7b.moderation import ACCEPTABLE, PAPER, Moderator, Policy
from tests.moderation.test_classifier import TEXTS


def chat(capsys, path: str, message: str, *extra: str) -> tuple[int, str, str]:
    rc = main(["chat", "--model", path, "--message", message, "--temperature", "0", "--max-tokens", "6", "--quiet",
               *extra])
    out = capsys.readouterr()
    return rc, out.out, out.err


def others(label: str) -> str:
    return ",".join(c.name for c in PAPER if c.name != label)


@pytest.fixture(scope="module")
def moderator(tiny_llm) -> Moderator:
    return Moderator(tiny_llm, "paper")


def test_flagged_prompt_is_refused(capsys, tiny_llm, tiny_mistral_path, moderator):
    text, m = next((t, m) for t, m in zip(TEXTS, moderator.classify(TEXTS)) if m.label != ACCEPTABLE)
    rc, out, _ = chat(capsys, tiny_mistral_path, text, "--moderate", "input", "--moderate-categories", m.label)
    title = Policy("paper").title(m.label)
    assert rc == 0 and out.strip() == f"[refused: your message was flagged as {title} (p={m.scores[m.label]:.2f})]"
    answer = tiny_llm.chat([{"role": "user", "content": text}], SamplingParams(temperature=0, max_tokens=6))
    rc, out, _ = chat(capsys, tiny_mistral_path, text, "--moderate", "input", "--moderate-categories", others(m.label))
    assert rc == 0 and out == answer.outputs[0].text + "\n"


def test_flagged_answer_is_withheld(capsys, tiny_llm, tiny_mistral_path, moderator):
    params = SamplingParams(temperature=0, max_tokens=6)
    answers = [o.outputs[0].text for o in tiny_llm.chat([[{"role": "user", "content": t}] for t in TEXTS], params)]
    judged = moderator.classify(list(zip(TEXTS, answers)))
    text, answer, m = next((t, a, m) for t, a, m in zip(TEXTS, answers, judged)
                           if m.label != ACCEPTABLE and a.strip())
    rc, out, _ = chat(capsys, tiny_mistral_path, text, "--moderate", "output", "--moderate-categories", m.label)
    title = Policy("paper").title(m.label)
    assert rc == 0 and out.strip() == f"[withheld: the answer was flagged as {title} (p={m.scores[m.label]:.2f})]"
    rc, out, _ = chat(capsys, tiny_mistral_path, text, "--moderate", "input,output",
                      "--moderate-categories", others(m.label))
    assert rc == 0 and out == answer + "\n"


@pytest.mark.parametrize("extra, match", [
    (["--moderate", "inputs"], "--moderate takes input, output or input,output; got 'inputs'"),
    (["--moderate", ","], "--moderate takes"),
    (["--moderate", "input", "--moderate-categories", "malware"], "unknown category 'malware' in taxonomy 'paper'"),
])
def test_bad_options_are_one_line_errors_before_loading(capsys, extra, match):
    rc, out, err = chat(capsys, "/nonexistent/model", "hi", *extra)  # the options fail before the model is opened
    assert rc == 1 and err.strip() == f"error: {err.strip()[7:]}" and match in err and "\n" not in err.strip()
