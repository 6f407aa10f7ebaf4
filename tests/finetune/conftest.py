"""Fixtures for fine-tuning: a tiny windowed Mistral (random weights written by transformers, the oracle) carrying
Mistral's v1 tokenizer file from mistral-common, and a small chat set whose answers follow a fixed pattern."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from tests.conftest import hf_model, tiny_args

WINDOW = 8
NAMES = ["Alice", "Bob", "Carol", "Dave", "Eve", "Frank", "Grace", "Heidi"]


def chat(name: str) -> dict:
    return {"messages": [{"role": "system", "content": "Be brief."},
                         {"role": "user", "content": f"Who is {name}?"},
                         {"role": "assistant", "content": f"{name} is a friend of mine from school."}]}


def write_jsonl(path, records) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


@pytest.fixture(scope="session")
def tiny_mistral(tmp_path_factory) -> str:
    """An HF-format tiny Mistral (window 8, vocab 32000) with tokenizer.model.v1 beside it."""
    import mistral_common

    folder = tmp_path_factory.mktemp("tiny_mistral")
    model = hf_model(tiny_args(window=WINDOW, vocab=32000))
    with torch.no_grad():  # small weights: a trainable start, unlike the sharp-attention test models
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.02)
    model.save_pretrained(folder)
    shutil.copyfile(os.path.join(os.path.dirname(mistral_common.__file__), "data", "tokenizer.model.v1"),
                    folder / "tokenizer.model.v1")
    return str(folder)


@pytest.fixture(scope="session")
def chats(tmp_path_factory) -> str:
    return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", [chat(n) for n in NAMES])
