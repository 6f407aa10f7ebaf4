"""The CPU decode path chosen at load (model/cpu_decode.py): the extension's DecodeStack runs a decode step's
blocks in one call with the ops and bits of the model's loop under CpuExtensionOps, for float, int8 and int4 models,
batches past the quantized layers' dense threshold included."""

from __future__ import annotations


import pytest
import torch

from mistral7b import cpu
from mistral7b.config import ModelArgs
from mistral7b.engine.sampling_params import SamplingParams
from mistral7b.model import cpu_decode
from mistral7b.model.fuse import fuse_projections
from mistral7b.model.quantize import INT4_DENSE_MIN_ROWS, quantize_model
from tests.conftest import engine_generate, random_model

pytestmark = pytest.mark.skipif(cpu.load(notice=False) is None, reason="CPU extension not built")

ARGS = ModelArgs(dim=128, n_layers=3, head_dim=32, hidden_dim=192, n_heads=4, n_kv_heads=2, norm_eps=1e-5,
                 vocab_size=160, sliding_window=24, max_seq_len=4096)


def model_for(mode):
    model = random_model(ARGS, seed=3)
    if mode is not None:
        quantize_model(model, mode, torch.float32)
    return fuse_projections(model)


@pytest.mark.parametrize("mode", [None, "int8", "int4"])
@pytest.mark.parametrize("batch", [3, INT4_DENSE_MIN_ROWS + 2])
def test_stack_gives_the_loops_tokens_and_logprobs(mode, batch, monkeypatch):
    model = model_for(mode)
    g = torch.Generator().manual_seed(batch)
    prompts = [torch.randint(0, 160, (int(n),), generator=g).tolist() for n in torch.randint(2, 40, (batch,))]
    params = [SamplingParams(max_tokens=30, temperature=0, logprobs=True, ignore_eos=True)] * batch
    calls = []

    class Counting:  # the stack, counting its steps
        def __init__(self, stack):
            self.stack = stack

        def forward(self, *a):
            calls.append(1)
            return self.stack.forward(*a)

    build = cpu_decode.build_stack
    monkeypatch.setattr(cpu_decode, "build_stack", lambda m, ops: Counting(build(m, ops)))
    with_stack, engine = engine_generate(model, prompts, params, block_size=8, enable_prefix_caching=False,
                                         max_num_seqs=batch)
    assert len(calls) >= 29  # every decode-only step
    monkeypatch.setattr(cpu_decode, "build_stack", lambda m, ops: None)
    loop, _ = engine_generate(model, prompts, params, block_size=8, enable_prefix_caching=False, max_num_seqs=batch)
    assert with_stack == loop


def test_a_projection_it_does_not_know_keeps_the_loop():
    model = model_for(None)
    model.layers[1].feed_forward.w2 = torch.nn.Linear(192, 128, bias=True)
    assert cpu_decode.build_stack(model, cpu.load()) is None
    assert not cpu_decode.quantized(model) and cpu_decode.quantized(model_for("int4"))


def test_bad_tensors_are_one_clear_error():
    with pytest.raises(RuntimeError, match="projection kind"):
        cpu.load().DecodeStack([[torch.ones(4), torch.ones(4), torch.ones(4, 4)]], [[7, 0, 0, 0]], 1, 1, 4, 1e-5,
                               [48, 48])
    with pytest.raises(RuntimeError, match="end early"):
        cpu.load().DecodeStack([[torch.ones(4), torch.ones(4), torch.ones(4, 4)]], [[0, 0, 0, 0]], 1, 1, 4, 1e-5,
                               [48, 48])
