"""The serving engine on the GPU kernel path (paged-attention and rotary-store Triton kernels), run on a CPU
by Triton's interpreter, against the core path (one sequence, no cache). The same scheduler steps mix decode
tiles (split over the keys) with pre-fill tiles; windowed models see sequences of 3W and more."""

from __future__ import annotations

import copy

import pytest
import torch

from mistral7b import kernels
from mistral7b.kernels.tuning import DecodeTuning
from mistral7b.model.fuse import fuse_projections
from tests.conftest import engine_generate, random_model, tiny_args
from tests.engine.test_llm_engine import assert_equal_to_core_path, greedy, make_prompts

pytestmark = pytest.mark.skipif(not kernels.available(), reason="triton is not installed")

W = 8
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module")
def windowed():
    return random_model(tiny_args(window=W, n_heads=4, n_kv_heads=2), seed=3)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("chunk,block_size", [(W - 1, 4), (W + 1, 16), (3 * W + 2, 3)])
def test_kernel_path_equals_core_path(windowed, chunk, block_size, fused):
    model = copy.deepcopy(windowed).to(DEVICE)  # a GPU runs the compiled kernels, a CPU the interpreter
    if fused:  # the fused projection takes the rotate-and-store kernel
        fuse_projections(model)
    prompts = make_prompts([1, W, 3 * W + 5, 4 * W + 3], seed=chunk)
    params = [greedy(n) for n in (2 * W + 3, 9, W + 1, 5)]
    out, engine = engine_generate(model, prompts, params, chunk_size=chunk, block_size=block_size,
                                  max_num_batched_tokens=chunk + 3, enable_prefix_caching=False,
                                  attention="triton")
    assert engine.attention.name == "triton"
    assert_equal_to_core_path(windowed, prompts, params, out)
    assert engine.blocks.usage == 0.0


def test_kernel_path_without_window_and_mha():
    model = random_model(tiny_args(window=None, n_heads=2, n_kv_heads=2), seed=5)
    prompts = make_prompts([2, 17, 40], seed=7)
    params = [greedy(n) for n in (30, 12, 4)]
    out, engine = engine_generate(copy.deepcopy(model).to(DEVICE), prompts, params, chunk_size=16, block_size=4,
                                  attention="triton")
    assert_equal_to_core_path(model, prompts, params, out)


@pytest.mark.parametrize("tuning", [
    DecodeTuning(True, True, True), DecodeTuning(True, True, False), DecodeTuning(False, False, False),
    DecodeTuning(True, False, True),
    DecodeTuning(early_epilogue=False, max_splits=2, decode_warps=2, kv_before_wait=False, argmax_kernel=False),
    DecodeTuning(False, False, False, rope_in_gemv=False)])
def test_one_token_steps_through_the_gemv_with_rotary_equal_core_path(windowed, monkeypatch, tuning):
    """Every one-row projection through the GEMV kernel, wqkv's with RoPE and the cache store folded in (on a
    GPU that is bfloat16 only; here forced for float32 so the engine can be held to the core path), and with
    the norms and residual adds folded in or apart (the norm before w13 started in wo's GEMV and finished in
    w13's, or a kernel between them), SwiGLU's product in w13's GEMV or in w2's; and every other value of the
    engine's DecodeTuning (wo's epilogue late, fewer key splits, more warps, keys after PDL's wait, PyTorch's
    argmax, RoPE in its own kernel)."""
    from torch import nn

    from mistral7b.kernels import gemv as gemv_module
    from mistral7b.model.one_token import OneTokenOps

    one_token = []

    def takes_kernel(module, x):
        return type(module) is nn.Linear and x.numel() == x.shape[-1]

    block = OneTokenOps.block

    def spy(self, layer, residual, *args):
        one_token.append(residual.shape)
        return block(self, layer, residual, *args)

    monkeypatch.setattr(gemv_module, "takes_kernel", takes_kernel)
    monkeypatch.setattr(OneTokenOps, "block", spy)
    prenorm, prenorm_calls = gemv_module.gemv_residual_prenorm, []

    def counted_prenorm(*args, **kwargs):
        prenorm_calls.append(1)
        return prenorm(*args, **kwargs)

    monkeypatch.setattr(gemv_module, "gemv_residual_prenorm", counted_prenorm)
    model = fuse_projections(copy.deepcopy(windowed).to(DEVICE))
    prompts = make_prompts([3 * W + 2], seed=12)
    params = [greedy(2 * W + 3)]
    out, engine = engine_generate(model, prompts, params, chunk_size=W + 1, block_size=4, attention="triton",
                                  enable_prefix_caching=False, tuning=tuning)
    assert model.plans.one_token.tuning is tuning  # the engine's setting is what the steps ran
    if engine.runner.graphs is None:
        assert bool(prenorm_calls) == (tuning.fold_norms and tuning.ffn_norm_in_wo)
    # every block of every decode step (on a GPU decode steps replay CUDA graphs, so the blocks run in Python
    # only while they are captured)
    layers = len(model.layers)
    assert len(one_token) >= (layers if engine.runner.graphs is not None else layers * (2 * W + 2))
    assert all(shape[:2] == (1, 1) for shape in one_token)
    assert_equal_to_core_path(windowed, prompts, params, out)


def test_kernel_path_reads_no_slot_before_it_is_written(windowed, monkeypatch):
    """New blocks are not zeroed on the kernel path: its loads stop at each row's length and find only written
    slots or the zero null block before it, so a pool of NaN but for the null block gives the core path's
    tokens (W = 8 with 4-token blocks: released blocks lie inside the kernel's 32-key tiles), and slots never
    written keep their NaN."""
    from mistral7b.cache.paged import PagedKVCache

    init = PagedKVCache.__init__

    def poisoned(self, *args, **kwargs):
        init(self, *args, **kwargs)
        for pool in self.k + self.v:
            pool[:, 1:].fill_(float("nan"))

    monkeypatch.setattr(PagedKVCache, "__init__", poisoned)
    prompts = make_prompts([3, W + 2, 3 * W + 1], seed=11)
    params = [greedy(n) for n in (W + 4, 6, 2 * W)]
    out, engine = engine_generate(copy.deepcopy(windowed).to(DEVICE), prompts, params, chunk_size=W - 1,
                                  block_size=4, enable_prefix_caching=False, attention="triton")
    assert_equal_to_core_path(windowed, prompts, params, out)
    assert engine.cache.k[0].isnan().any()
