"""The decode graph's input spread (kernels/graph_inputs.py) against the PyTorch copies it replaces, through
Triton's interpreter on a CPU (compiled on a GPU): block tables narrower and wider than one block of the loop,
rows past b left alone."""

from __future__ import annotations

import pytest
import torch

from mistral7b import kernels

pytestmark = pytest.mark.skipif(not kernels.available(), reason="triton is not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("b,n_blocks", [(1, 3), (5, 80), (3, 1030)])
def test_spread_equals_column_copies(b, n_blocks):
    from mistral7b.kernels.graph_inputs import spread_inputs

    B, staged = b + 2, 4
    g = torch.Generator().manual_seed(n_blocks)
    inputs = torch.randint(0, 2**31 - 1, (B, staged + n_blocks), generator=g).to(DEVICE)
    tokens, positions = (torch.full((1, B), -1, dtype=torch.long, device=DEVICE) for _ in range(2))
    slots = torch.full((B,), -1, dtype=torch.long, device=DEVICE)
    seq_lens = torch.full((B,), -1, dtype=torch.int32, device=DEVICE)
    tables = torch.full((B, n_blocks), -1, dtype=torch.int32, device=DEVICE)
    spread_inputs(inputs[:b], tokens[0, :b], positions[0, :b], slots[:b], seq_lens[:b], tables[:b], staged)
    assert torch.equal(tokens[0, :b], inputs[:b, 0]) and torch.equal(positions[0, :b], inputs[:b, 1])
    assert torch.equal(slots[:b], inputs[:b, 2])
    assert torch.equal(seq_lens[:b], inputs[:b, 3].int()) and torch.equal(tables[:b], inputs[:b, staged:].int())
    for t in (tokens[0, b:], positions[0, b:], slots[b:], seq_lens[b:], tables[b:]):
        assert (t == -1).all()  # padding rows beyond b untouched
