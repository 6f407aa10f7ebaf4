"""lm-evaluation-harness through our server: its `local-completions` (echo + logprobs, token-id prompts in
batches, the remote tokenizer over /tokenizer_info and /tokenize) and `local-chat-completions` backends give
the same results as our own `mistral7b` lm-eval model offline, task by task and sample by sample.

The embedded SmolLM2 serves (float32, exact): its tokenizer adds no BOS, so lm-eval's remote tokenizer (which
never asks for special tokens) and the offline model see the same ids. With a Mistral checkpoint the remote
path scores without BOS, as it does against vLLM.
"""

from __future__ import annotations

import lm_eval
import pytest
from lm_eval.tasks import TaskManager

from mistral7b.eval.lm_eval_model import Mistral7BLM
from tests.conftest import smollm2_path
from tests.eval.test_lm_eval_model import GEN_CONFIG, MC_CONFIG, PPL_CONFIG, QUESTIONS
from tests.eval.conftest import write_task
from tests.server.conftest import start_server

MAX_LENGTH = 64  # short enough that the perplexity texts need several rolling windows


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tasks")
    write_task(folder, "srv_mc", [{"question": q, "choices": c, "label": y} for q, c, y in QUESTIONS], MC_CONFIG)
    write_task(folder, "srv_gen", [{"question": q, "answer": "Paris"} for q in
                                   ["The capital of France is", "Question: what is 2 + 2?\nAnswer:",
                                    "Once upon a time"]], GEN_CONFIG)
    text = ("Sliding window attention lets each token attend to the previous W tokens; stacked layers carry "
            "information further back. The rolling buffer cache keeps the last W keys and values. ") * 2
    write_task(folder, "srv_ppl", [{"text": text}, {"text": "Short text."}], PPL_CONFIG)
    return str(folder)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    s = start_server(smollm2_path(), str(tmp_path_factory.mktemp("lm_eval_server")), "--quantize", "none",
                     "--dtype", "float32", "--max-model-len", str(MAX_LENGTH))
    yield s
    s.stop()


def run(model, model_args, tasks: str, names: list[str], **kw):
    return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=names, bootstrap_iters=0,
                                   task_manager=TaskManager(include_path=tasks, include_defaults=False),
                                   log_samples=True, **kw)


def test_local_completions_equals_the_offline_model(served, tasks):
    names = ["srv_mc", "srv_gen", "srv_ppl"]
    name = served.client().models.list().data[0].id
    remote = run("local-completions", f"model={name},base_url={served.v1}/completions,max_length={MAX_LENGTH},"
                                      "batch_size=3,tokenizer_backend=remote", tasks, names)
    offline = run(Mistral7BLM(model=smollm2_path(), dtype="float32", quantize="none", max_length=MAX_LENGTH),
                  None, tasks, names[:2])
    assert remote["results"]["srv_mc"]["acc,none"] == offline["results"]["srv_mc"]["acc,none"]
    for r, o in zip(remote["samples"]["srv_mc"], offline["samples"]["srv_mc"]):
        assert [x[0][0] for x in r["resps"]] == pytest.approx([x[0][0] for x in o["resps"]], abs=1e-4)
        assert [x[0][1] for x in r["resps"]] == [x[0][1] for x in o["resps"]]
    assert [s["resps"] for s in remote["samples"]["srv_gen"]] == [s["resps"] for s in offline["samples"]["srv_gen"]]
    assert any(s["resps"][0][0].strip() for s in remote["samples"]["srv_gen"])
    # lm-eval's API models keep one token of max_length for the generated token and cut rolling windows one
    # shorter again, so each window reads max_length - 2 tokens: the offline model reads the same windows so.
    offline_ppl = run(Mistral7BLM(model=smollm2_path(), dtype="float32", quantize="none",
                                  max_length=MAX_LENGTH - 2), None, tasks, ["srv_ppl"])
    for metric in ("bits_per_byte,none", "word_perplexity,none"):
        assert remote["results"]["srv_ppl"][metric] == pytest.approx(offline_ppl["results"]["srv_ppl"][metric],
                                                                     rel=1e-5)


def test_local_chat_completions_equals_the_offline_model(served, tasks):
    name = served.client().models.list().data[0].id
    remote = run("local-chat-completions", f"model={name},base_url={served.v1}/chat/completions", tasks,
                 ["srv_gen"], apply_chat_template=True)
    offline = run(Mistral7BLM(model=smollm2_path(), dtype="float32", quantize="none", max_length=MAX_LENGTH),
                  None, tasks, ["srv_gen"], apply_chat_template=True)
    got = [s["resps"][0][0] for s in remote["samples"]["srv_gen"]]
    assert got == [s["resps"][0][0] for s in offline["samples"]["srv_gen"]]
    assert any(g.strip() for g in got)
