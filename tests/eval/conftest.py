"""Fixtures for the evaluation tests: a tiny random Mistral with the real v1 tokenizer, and local tasks.

The checkpoint is written by transformers (the oracle for every log-likelihood here) with Mistral's own
tokenizer.model.v1 beside it, so lm-eval's text requests are tokenized as for Mistral 7B. Tasks are YAML
configs written per test over JSONL files (`dataset_path: json`), so nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from tests.conftest import hf_model, tiny_args

pytest.importorskip("lm_eval")
import mistral_common  # noqa: E402

V1 = os.path.join(os.path.dirname(mistral_common.__file__), "data", "tokenizer.model.v1")


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_mistral(tmp_path_factory):
    """(transformers model, folder): 2 layers, window 8, vocab 32000, random weights, tokenizer v1."""
    args = tiny_args(window=8, vocab=32000)
    model = hf_model(args, seed=3)
    folder = tmp_path_factory.mktemp("tiny_mistral")
    model.save_pretrained(folder)
    shutil.copy(V1, folder / "tokenizer.model.v1")
    return model, str(folder)


def hf_logprob(model, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    """The oracle: one direct transformers forward pass over context + continuation."""
    ids = torch.tensor([context + continuation])
    with torch.no_grad():
        logp = model(ids).logits[0].float().log_softmax(-1)
    rows = torch.arange(len(context) - 1, len(context) + len(continuation) - 1)
    target = torch.tensor(continuation)
    return float(logp[rows, target].sum()), bool((logp[rows].argmax(-1) == target).all())


def write_task(folder, name: str, rows: list[dict], config: str) -> str:
    """A local lm-eval task: rows as JSONL and a YAML config reading them; returns the folder."""
    os.makedirs(folder, exist_ok=True)
    data = os.path.join(folder, f"{name}.jsonl")
    with open(data, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    head = f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
    with open(os.path.join(folder, f"{name}.yaml"), "w", encoding="utf-8") as f:
        f.write(head + config)
    return str(folder)
