"""Programmatic dependent launch (kernels/pdl.py): when it is used, and on a Hopper GPU that a decode with it
gives bit-for-bit the tokens and logprobs of one without (kernels launched early must still see every earlier
write: a missing wait shows up as wrong or changing values)."""

from __future__ import annotations

import copy

import pytest
import torch

from mistral7b import kernels
from mistral7b.kernels import pdl
from tests.conftest import engine_generate, random_model, tiny_args
from tests.engine.test_llm_engine import make_prompts

pytestmark = pytest.mark.skipif(not kernels.available(), reason="triton is not installed")


def test_only_one_token_steps_on_cuda_and_switchable(monkeypatch):
    assert not pdl.enabled(torch.device("cpu"), 1)  # the interpreter never gets the instructions
    assert not pdl.enabled(torch.device("cuda"), 2)  # decided before any CUDA call: batches launch plainly
    monkeypatch.setenv("MISTRAL7B_PDL", "0")
    assert not pdl.enabled(torch.device("cuda"), 1)
    assert pdl.options(torch.device("cpu"), 1) == {"PDL": False}  # no launch_pdl for the interpreter


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
                    reason="needs a Hopper (or later) GPU")
def test_decode_with_pdl_equals_without(monkeypatch):
    from mistral7b.engine.sampling_params import SamplingParams
    from mistral7b.model.fuse import fuse_projections

    assert pdl.enabled(torch.device("cuda"), 1)
    model = fuse_projections(random_model(tiny_args(window=8, n_heads=4, n_kv_heads=2), seed=21))
    model = model.to("cuda", torch.bfloat16)  # bfloat16: the one-row projections take the GEMV kernel
    prompts = make_prompts([5, 30], seed=22)
    params = [SamplingParams(max_tokens=40, temperature=0, logprobs=True, ignore_eos=True)] * 2
    runs = []
    for flag in ("1", "0", "1"):
        monkeypatch.setenv("MISTRAL7B_PDL", flag)
        out, engine = engine_generate(copy.deepcopy(model), prompts, params, block_size=4, max_num_seqs=1)
        assert engine.runner.graphs is not None  # decode steps replay CUDA graphs
        runs.append(out)
    assert runs[0] == runs[1] == runs[2]


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
                    reason="needs a Hopper (or later) GPU")
def test_gemv_with_pdl_equals_without(monkeypatch):
    from mistral7b.kernels import gemv as gemv_module

    g = torch.Generator().manual_seed(23)
    w = torch.randn(512, 4096, generator=g).to("cuda", torch.bfloat16)
    x = torch.randn(1, 1, 4096, generator=g).to("cuda", torch.bfloat16)
    monkeypatch.setenv("MISTRAL7B_PDL", "0")
    want = gemv_module.gemv(x, w)
    monkeypatch.setenv("MISTRAL7B_PDL", "1")
    for _ in range(3):
        assert torch.equal(gemv_module.gemv(x, w), want)
