"""A tiny random Mistral checkpoint that carries Mistral's real v1 tokenizer, for the whole moderation path.

Random weights make the model's labels arbitrary but deterministic, which is what the plumbing tests need:
they read the model's own scores and check that every layer above (policy, API shape, chat) follows them.
The window (256) is shorter than the classification prompt (about 400 tokens), so it is exercised too.
"""

from __future__ import annotations

import os
import shutil

import pytest

from mistral7b.config import ModelArgs
from mistral7b.loading.writers import save_native
from tests.loading.conftest import random_state
from tests.tokenizer.conftest import V1

ARGS = ModelArgs(dim=64, n_layers=2, head_dim=16, hidden_dim=96, n_heads=4, n_kv_heads=2, norm_eps=1e-5,
                 vocab_size=32000, rope_theta=10000.0, sliding_window=256, max_seq_len=4096)


@pytest.fixture(scope="session")
def tiny_mistral_path(tmp_path_factory) -> str:
    folder = str(tmp_path_factory.mktemp("tiny_mistral"))
    save_native(folder, ARGS, random_state(ARGS, seed=1))
    shutil.copy(V1, os.path.join(folder, "tokenizer.model.v1"))
    return folder


@pytest.fixture(scope="session")
def tiny_llm(tiny_mistral_path: str):
    from mistral7b import LLM

    return LLM(tiny_mistral_path, chunk_size=64, progress=False)
