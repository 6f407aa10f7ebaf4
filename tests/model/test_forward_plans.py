"""The model's one forward and the plans chosen for it (model/forward_plans.py, model/forward_ops.py): which
operation set runs which step, the same bits as the textbook loop, and activation checkpointing per block."""

from __future__ import annotations

import copy

import pytest
import torch

from mistral7b import attention, cpu, kernels
from mistral7b.cache.paged import Span
from mistral7b.finetune.trainer import _checkpoint_blocks
from mistral7b.model import forward_plans
from mistral7b.model.attention import AttentionMetadata
from mistral7b.model.forward_ops import TORCH_OPS, CpuExtensionOps, TritonOps
from mistral7b.model.fuse import fuse_projections
from mistral7b.model.rope import rotary_freqs
from tests.conftest import random_model, tiny_args

EXTENSION = cpu.load(notice=False)


def textbook_logits(model, tokens, positions, index=None):
    """h = h + attention(norm(h)); h = h + ffn(norm(h)); output(norm(h)): the paper's block, written out with the
    model's own modules (the oracle of the residual-stream reorganisation); `index` picks rows of h first (a
    matmul's bits depend on its row count)."""
    meta = AttentionMetadata.without_cache(positions, model.args.sliding_window)
    freqs = rotary_freqs(positions, model.inv_freq(tokens.device))
    h = model.tok_embeddings(tokens)
    for i, layer in enumerate(model.layers):
        h = h + layer.attention(layer.attention_norm(h), freqs, meta, None, i)
        h = h + layer.feed_forward(layer.ffn_norm(h))
    if index is not None:
        h = h.reshape(-1, h.shape[-1])[index]
    return model.output(model.norm(h)).float()


@pytest.mark.parametrize("fused", [False, True])
def test_pytorch_plan_gives_the_textbook_bits(fused):
    model = random_model(tiny_args(window=6), seed=4)
    if fused:
        fuse_projections(model)
    tokens = torch.randint(0, model.args.vocab_size, (2, 19), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(19).expand(2, 19)
    model.plans = None
    with torch.inference_mode():
        assert torch.equal(model(tokens, positions), textbook_logits(model, tokens, positions))
        index = torch.tensor([3, 25, 37])
        assert torch.equal(model(tokens, positions, logits_index=index),
                           textbook_logits(model, tokens, positions, index))


def test_checkpointed_blocks_give_the_same_gradients():
    """Activation checkpointing wraps each block's forward (finetune/trainer.py): the loop calls it per block, and
    the gradients equal those of the plain run."""
    model = random_model(tiny_args(window=None), seed=1)
    tokens = torch.randint(0, model.args.vocab_size, (2, 12), generator=torch.Generator().manual_seed(2))
    positions = torch.arange(12).expand(2, 12)
    model(tokens, positions).square().mean().backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    checkpointed = copy.deepcopy(model)
    _checkpoint_blocks(checkpointed)
    calls = []
    for layer in checkpointed.layers:
        inner = layer.forward
        layer.forward = lambda *a, _inner=inner, **k: calls.append(1) or _inner(*a, **k)
    checkpointed(tokens, positions).square().mean().backward()
    assert len(calls) == len(model.layers)
    for n, p in checkpointed.named_parameters():
        torch.testing.assert_close(p.grad, plain[n], rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(EXTENSION is None, reason="CPU extension not built")
def test_cpu_plans_by_backend_and_step():
    model = fuse_projections(random_model(tiny_args(window=8), seed=2))
    plans = forward_plans.choose(model)  # at load: no backend yet
    assert isinstance(plans.plain, CpuExtensionOps) and plans.stack is None and plans.one_token is None
    h = torch.zeros(1, 3, model.args.dim)
    assert plans.pick(h, None, None) is TORCH_OPS  # autograd on: PyTorch's ops only
    torch.set_grad_enabled(False)
    try:
        _check_cpu_picks(model, h)
    finally:
        torch.set_grad_enabled(True)


def _check_cpu_picks(model, h):
    plans = forward_plans.choose(model)
    assert plans.pick(h, None, None) is plans.plain
    native = attention.build(model.args, 16, 4, torch.float32, "cpu")
    assert native.name == "cpu_native"
    plans = forward_plans.choose(model, native.name)
    span = lambda start, n: Span(start, n, [1, 2, 3], 0)  # noqa: E731
    decode_only = native.build([span(5, 1)], [])
    mixed = native.build([span(5, 1)], [span(0, 4)])
    assert plans.pick(h, native, decode_only) is plans.stack and plans.stack is not None
    assert plans.pick(h, native, mixed) is plans.paged
    torch_backend = attention.build(model.args, 16, 4, torch.float32, "cpu", "torch")
    assert plans.pick(h, torch_backend, torch_backend.build([span(5, 1)], [])) is plans.plain
    assert forward_plans.choose(model, "torch").stack is None
    assert copy.deepcopy(model).plans is None  # a copy's modules are not the plans' modules
    assert forward_plans.choose(model.to(torch.float16)).plain is TORCH_OPS  # no extension ops for float16


@pytest.mark.skipif(not kernels.available(), reason="triton is not installed")
def test_triton_plans_need_fused_projections():
    model = random_model(tiny_args(window=8), seed=2)
    assert not isinstance(forward_plans.choose(model, "triton").paged, TritonOps)
    fuse_projections(model)
    plans = forward_plans.choose(model, "triton")
    assert isinstance(plans.paged, TritonOps)
    assert plans.one_token is None  # float32 weights on a CPU: no GEMV kernel
    assert not plans.paged.needs_freqs  # the backend rotates
