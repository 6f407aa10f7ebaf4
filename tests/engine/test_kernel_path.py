"""The serving engine on the GPU kernel path (paged-attention and rotary-store Triton kernels), run on a CPU
by Triton's interpreter, against the core path (one sequence, no cache). The same scheduler steps mix decode
tiles (split over the keys) with pre-fill tiles; windowed models see sequences of 3W and more."""

from __future__ import annotations

import copy

import pytest
import torch

from mistral7b import kernels
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
    assert engine.cache.use_kernel
    assert_equal_to_core_path(windowed, prompts, params, out)
    assert engine.blocks.usage == 0.0


def test_kernel_path_without_window_and_mha():
    model = random_model(tiny_args(window=None, n_heads=2, n_kv_heads=2), seed=5)
    prompts = make_prompts([2, 17, 40], seed=7)
    params = [greedy(n) for n in (30, 12, 4)]
    out, engine = engine_generate(copy.deepcopy(model).to(DEVICE), prompts, params, chunk_size=16, block_size=4,
                                  attention="triton")
    assert_equal_to_core_path(model, prompts, params, out)
