"""Building a model from a checkpoint (model/build.py): it must not pay for what it does not use. nn.Embedding's
random init on the meta device imported torch._dynamo, 1.3 s of `mistral7b chat`'s time to first token on the
2-core machine; the table is loaded right after, so build_model skips that init."""

from __future__ import annotations

import subprocess
import sys

import torch

from tests.conftest import load_ours, tiny_args, write_tiny_mistral

SCRIPT = """
import sys
import torch
from mistral7b.loading import open_checkpoint
from mistral7b.model.build import build_model
model = build_model(open_checkpoint(sys.argv[1]), torch.float32, progress=False)
assert model.tok_embeddings.weight.device.type == "cpu"
print("dynamo imported" if "torch._dynamo" in sys.modules else "dynamo not imported")
"""


def test_building_does_not_import_dynamo(tmp_path):
    folder = write_tiny_mistral(str(tmp_path / "ckpt"), tiny_args(), seed=3)
    out = subprocess.run([sys.executable, "-c", SCRIPT, folder], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "dynamo not imported"


def test_the_embedding_table_is_the_checkpoints(tmp_path):
    from mistral7b.loading import open_checkpoint

    folder = write_tiny_mistral(str(tmp_path / "ckpt"), tiny_args(), seed=4)
    stored = dict(open_checkpoint(folder).tensors())["tok_embeddings.weight"]
    assert torch.equal(load_ours(folder).tok_embeddings.weight, stored.float())
