"""The PyTorch backend's one-query attention (attention/torch_paged.py `one_query_attention`); the whole paged
path is tested through the engine against the core path (tests/engine/test_llm_engine.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mistral7b.attention.torch_paged import one_query_attention


def matmul_attention(q, k, v, bias):
    """The same attention through torch.matmul on the 4-d shapes (how it was written before it called bmm)."""
    S, H, D = q.shape
    H_kv, K = k.shape[0], k.shape[2]
    grouped = q.view(S, H_kv, H // H_kv, D).transpose(0, 1)
    scores = torch.matmul(grouped, k.transpose(-1, -2)).float() * D**-0.5 + bias.view(1, S, 1, K)
    out = torch.matmul(scores.softmax(-1).to(v.dtype), v)
    return out.transpose(0, 1).reshape(S, H, D)


def inputs(S, H, H_kv, K, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = (2 * torch.randn(S, H, D, generator=g)).to(dtype)
    k = (2 * torch.randn(H_kv, S, K, D, generator=g)).to(dtype)
    v = torch.randn(H_kv, S, K, D, generator=g).to(dtype)
    valid = torch.arange(K)[None] < torch.tensor([K - 5 * i for i in range(S)])[:, None]  # padding per row
    bias = torch.zeros(S, K).masked_fill_(~valid, float("-inf"))
    return q, k, v, bias, valid


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("S", [1, 3])
def test_bit_for_bit_the_matmul_formulation(dtype, S):
    # Greedy decoding of a bfloat16 model flips tokens on a one-ulp change: the bmm form must not change a bit.
    q, k, v, bias, _ = inputs(S, H=9, H_kv=3, K=640, D=64, dtype=dtype)
    assert torch.equal(one_query_attention(q, k, v, bias), matmul_attention(q, k, v, bias))


@pytest.mark.parametrize("S", [1, 4])
def test_equals_sdpa_over_each_rows_valid_keys(S):
    q, k, v, bias, valid = inputs(S, H=8, H_kv=2, K=48, D=16, dtype=torch.float32, seed=1)
    out = one_query_attention(q, k, v, bias)
    for row in range(S):
        n = int(valid[row].sum())
        ref = F.scaled_dot_product_attention(q[row, :, None].double(), k[:, row, :n].double(),
                                             v[:, row, :n].double(), enable_gqa=True)  # [H, 1, D]
        torch.testing.assert_close(out[row].double(), ref[:, 0], atol=1e-5, rtol=1e-5)
