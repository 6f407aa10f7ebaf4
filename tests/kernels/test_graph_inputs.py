"""The decode graph's input spread (kernels/graph_inputs.py) against the PyTorch copies it replaces, through
Triton's interpreter on a CPU (compiled on a GPU): block tables narrower and wider than one block of the loop,
rows past b left alone, the turn read on the device, negative tokens taken from the picks."""

from __future__ import annotations

import pytest
import torch

from mistral7b import kernels

pytestmark = pytest.mark.skipif(not kernels.available(), reason="triton is not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("b,n_blocks,turn", [(1, 3, 0), (5, 80, 1), (3, 1030, 1)])
def test_spread_equals_column_copies(b, n_blocks, turn):
    from mistral7b.kernels.graph_inputs import spread_inputs

    B, staged = b + 2, 4
    g = torch.Generator().manual_seed(n_blocks)
    turns = torch.randint(0, 2**31 - 1, (2, B, staged + n_blocks), generator=g)
    picks = torch.randint(0, 2**31 - 1, (B,), generator=g)
    turns[turn, 0, 0] = -1 - (B - 1)  # row 0 takes the last pick; the other turn's rows are not read
    turns[1 - turn] = -5
    inputs = turns[turn].clone()
    inputs[0, 0] = picks[B - 1]
    tokens, positions = (torch.full((1, B), -1, dtype=torch.long, device=DEVICE) for _ in range(2))
    slots = torch.full((B,), -1, dtype=torch.long, device=DEVICE)
    seq_lens = torch.full((B,), -1, dtype=torch.int32, device=DEVICE)
    tables = torch.full((B, n_blocks), -1, dtype=torch.int32, device=DEVICE)
    spread_inputs(turns[:, :b].to(DEVICE), torch.tensor([turn], dtype=torch.int32, device=DEVICE), picks.to(DEVICE),
                  tokens[0, :b], positions[0, :b], slots[:b], seq_lens[:b], tables[:b], staged)
    inputs = inputs.to(DEVICE)
    assert torch.equal(tokens[0, :b], inputs[:b, 0]) and torch.equal(positions[0, :b], inputs[:b, 1])
    assert torch.equal(slots[:b], inputs[:b, 2])
    assert torch.equal(seq_lens[:b], inputs[:b, 3].int()) and torch.equal(tables[:b], inputs[:b, staged:].int())
    for t in (tokens[0, b:], positions[0, b:], slots[b:], seq_lens[b:], tables[b:]):
        assert (t == -1).all()  # padding rows beyond b untouched


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory read by a kernel needs a GPU")
def test_spread_reads_pinned_host_rows():
    from mistral7b.kernels.graph_inputs import spread_inputs

    turns = torch.arange(2 * 2 * 6, dtype=torch.long).view(2, 2, 6).pin_memory()
    tokens, positions, slots = (torch.zeros(2, dtype=torch.long, device="cuda") for _ in range(3))
    seq_lens, tables = torch.zeros(2, dtype=torch.int32, device="cuda"), torch.zeros(2, 2, dtype=torch.int32,
                                                                                     device="cuda")
    turns[1, 1, 0] = -2  # pick 1
    turn, picks = torch.ones(1, dtype=torch.int32, device="cuda"), torch.tensor([7, 8], device="cuda")
    spread_inputs(turns, turn, picks, tokens, positions, slots, seq_lens, tables, 4)
    assert tokens.tolist() == [12, 8] and positions.tolist() == [13, 19] and tables.tolist() == [[16, 17], [22, 23]]
