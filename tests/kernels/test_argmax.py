"""The greedy-pick kernel (kernels/argmax.py) against torch.argmax, through Triton's interpreter on a CPU (the
compiled kernel on a GPU): rows shorter and longer than a chunk, ties within and across chunks, rows of -inf,
NaN, rows with a stride, the picks also written to a mirror at the turn read on the device, and the dispatch."""

from __future__ import annotations

import pytest
import torch

from mistral7b import kernels

pytestmark = pytest.mark.skipif(not kernels.available(), reason="triton is not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def small_chunks(monkeypatch):
    from mistral7b.kernels import argmax

    monkeypatch.setattr(argmax, "CHUNK", 64)  # several chunks at interpreter-sized rows


@pytest.mark.parametrize("n,V", [(1, 32000), (3, 1000), (5, 37), (2, 64)])
def test_equals_torch_argmax(n, V):
    from mistral7b.kernels.argmax import argmax_rows

    logits = torch.randn(n, V, generator=torch.Generator().manual_seed(V)).to(DEVICE)
    assert torch.equal(argmax_rows(logits), logits.argmax(-1))


@pytest.mark.parametrize("V", [64, 65, 300])
def test_chunks_and_ties_keep_the_lowest_index(small_chunks, V):
    from mistral7b.kernels.argmax import argmax_rows

    logits = torch.randn(4, V, generator=torch.Generator().manual_seed(1)) - 10.0
    logits[0, [3, V - 1]] = 5.0  # a tie across chunks (V > 64)
    logits[1, [V - 2, V - 1]] = 5.0  # a tie in the last chunk
    logits[2, V - 1] = 5.0  # the maximum in a partial last chunk
    logits[3] = float("-inf")  # nothing but -inf: index 0, as torch gives
    got = argmax_rows(logits.to(DEVICE)).cpu()
    assert got.tolist() == [3, V - 2, V - 1, 0] == logits.argmax(-1).tolist()


def test_nan_wins_strided_rows_and_no_rows(small_chunks):
    from mistral7b.kernels.argmax import argmax_rows

    wide = torch.randn(3, 200, generator=torch.Generator().manual_seed(2))
    wide[1, 150] = float("nan")
    rows = wide[:, :180].to(DEVICE) if DEVICE == "cpu" else wide.to(DEVICE)[:, :180]
    assert rows.stride(0) == 200
    got = argmax_rows(rows).cpu()
    assert got[1] == 150 and torch.equal(got, wide[:, :180].argmax(-1))
    assert argmax_rows(torch.zeros(0, 10, device=DEVICE)).shape == (0,)


@pytest.mark.parametrize("turn", [0, 1])
def test_given_output_and_mirror_at_the_turn(turn):
    from mistral7b.kernels.argmax import argmax_rows

    logits = torch.randn(3, 500, generator=torch.Generator().manual_seed(turn)).to(DEVICE)
    out = torch.full((5,), -1, dtype=torch.long, device=DEVICE)
    mirror = torch.full((2, 5), -1, dtype=torch.long)
    if DEVICE == "cuda":
        mirror = mirror.pin_memory()  # written by the kernel over the bus
    got = argmax_rows(logits, out[:3], mirror, torch.tensor([turn], dtype=torch.int32, device=DEVICE))
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    want = logits.argmax(-1).cpu()
    assert got.data_ptr() == out.data_ptr() and torch.equal(out[:3].cpu(), want) and out[3:].tolist() == [-1, -1]
    assert torch.equal(mirror[turn, :3], want) and mirror[turn, 3:].tolist() == [-1, -1]
    assert (mirror[1 - turn] == -1).all()


def test_dispatch_takes_the_kernel_only_on_cuda(monkeypatch):
    from mistral7b.kernels import argmax

    calls = []
    monkeypatch.setattr(argmax, "argmax_rows", lambda x: calls.append(x) or x.argmax(-1))
    logits = torch.randn(2, 50)
    assert torch.equal(argmax.greedy_picks(logits), logits.argmax(-1))
    assert calls == []  # a CPU tensor: torch's own
    if torch.cuda.is_available():
        argmax.greedy_picks(logits.cuda())
        assert len(calls) == 1
