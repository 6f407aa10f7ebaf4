"""The CPU extension's top-p threshold (mistral7b/cpu/sample.cpp) against the sorted rule it replaces (the
oracle, in float64): token i of a row sorted in descending order is kept iff the tokens before it hold less than
top_p. The threshold t must be the smallest value that rule keeps, so `probs >= t` is the rule's set where the
boundary has no ties and that set plus the boundary's ties otherwise. Rows flat and peaked, with exact ties and
zeros, short and of a real vocabulary; on the build for this process's CPU capability, and again under every
other capability this CPU can run (a fresh process each, as tests/cpu/test_capabilities.py does for the others).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from mistral7b import cpu
from mistral7b.cpu import build

pytestmark = pytest.mark.skipif(cpu.load(notice=False) is None, reason="CPU extension not built")
TOP_PS = [0.0, 0.3, 0.9, 0.95, 1.0]
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def sorted_rule(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """[B, V] bool: the oracle's kept set, summed in float64 over the sorted row. top_p >= 1 keeps the whole row
    (the op's contract: a normalised row's float32 total may round above 1) and top_p <= 0 its maximum."""
    values, ids = probs.double().sort(-1, descending=True)
    keep = (values.cumsum(-1) - values) < top_p.double()[:, None]
    keep[:, 0] = True  # the most likely token always (top_p 0: its ties join it below)
    keep |= (top_p >= 1.0)[:, None]
    return torch.zeros_like(probs, dtype=torch.bool).scatter(1, ids, keep)


def assert_matches_sorted_rule(probs: torch.Tensor, top_p: torch.Tensor) -> None:
    t = cpu.load(notice=False).top_p_threshold(probs, top_p)
    assert t.shape == (probs.shape[0],) and t.dtype == torch.float32
    kept, rule = probs >= t[:, None], sorted_rule(probs, top_p)
    for row in range(probs.shape[0]):
        smallest = probs[row][rule[row]].min()
        assert t[row] == smallest, (row, float(top_p[row]), float(t[row]), float(smallest))
        assert (kept[row] == (rule[row] | (probs[row] == smallest))).all()  # the rule's set and its boundary ties
        if (probs[row] == smallest).sum() == 1:
            assert torch.equal(kept[row], rule[row])


def flat(B: int, V: int, seed: int) -> torch.Tensor:
    return (torch.randn(B, V, generator=torch.Generator().manual_seed(seed)) * 0.5).softmax(-1)


def peaked(B: int, V: int, seed: int) -> torch.Tensor:
    return (torch.randn(B, V, generator=torch.Generator().manual_seed(seed)) * 6).softmax(-1)


def tied(B: int, V: int, seed: int) -> torch.Tensor:
    """Few distinct values (counts 0..4 over their total): many exact ties and zeros."""
    counts = torch.randint(0, 5, (B, V), generator=torch.Generator().manual_seed(seed)).float()
    counts[:, 0] += 1  # no row of zeros only
    return counts / counts.sum(-1, keepdim=True)


def masked(B: int, V: int, seed: int) -> torch.Tensor:
    """A softmax with most logits at -inf (banned tokens): exact zeros beside a flat rest."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, V, generator=g)
    logits[torch.rand(B, V, generator=g) < 0.7] = float("-inf")
    logits[:, 0] = 0.0
    return logits.softmax(-1)


@pytest.mark.parametrize("make", [flat, peaked, tied, masked])
@pytest.mark.parametrize("V", [1, 7, 100, 1000, 49152])
@pytest.mark.parametrize("top_p", TOP_PS)
def test_threshold_keeps_the_sorted_rules_set(make, V, top_p):
    probs = make(12, V, seed=V)
    assert_matches_sorted_rule(probs, torch.full((12,), top_p))


def test_rows_with_their_own_top_p():
    probs = torch.cat([flat(40, 4096, 1), peaked(40, 4096, 2), tied(40, 4096, 3)])
    top_p = torch.rand(120, generator=torch.Generator().manual_seed(4))
    top_p[::7] = torch.tensor(TOP_PS).repeat(4)[: len(top_p[::7])]
    assert_matches_sorted_rule(probs, top_p)


def test_exact_boundaries_and_rows_below_top_p():
    """Sums that reach top_p exactly (binary fractions: no rounding anywhere), ties straddling the boundary,
    rows whose total is below top_p (everything kept: their minimum), a row of zeros, -0.0, denormals."""
    probs = torch.tensor([
        [0.5, 0.25, 0.125, 0.125],  # top_p 0.75: 0.5 + 0.25 reach it exactly, 0.125s are out
        [0.25, 0.25, 0.25, 0.25],  # all tied: all kept
        [0.5, 0.25, 0.25, 0.0],  # the 0.25s straddle 0.75: both kept, the zero not
        [0.1, 0.2, 0.1, 0.05],  # total 0.45 < 0.75: all kept
        [0.0, 0.0, 0.0, 0.0],
        [-0.0, 0.5, 0.5, 0.0],
        [1e-45, 3e-45, 0.75, 1e-40],  # 0.75 alone reaches it
    ])
    top_p = torch.full((len(probs),), 0.75)
    assert_matches_sorted_rule(probs, top_p)
    t = cpu.load(notice=False).top_p_threshold(probs, top_p)
    assert t.tolist() == [0.25, 0.25, 0.25, 0.05000000074505806, 0.0, 0.5, 0.75]


@pytest.mark.parametrize("probs,top_p,message", [
    (torch.rand(2, 8, dtype=torch.float64), torch.rand(2), "probs: float32"),
    (torch.rand(8), torch.rand(1), r"probs: \[rows, vocab\], got 1 dimension"),
    (torch.rand(2, 8).t(), torch.rand(8), "probs: contiguous"),
    (torch.rand(2, 0), torch.rand(2), "probs: an empty vocabulary"),
    (torch.rand(2, 8), torch.rand(3), r"top_p: \[rows\] = \[2\], got \[3\]"),
    (torch.rand(2, 8), torch.rand(2, 1), r"top_p: \[rows\] = \[2\], got \[2, 1\]"),
    (torch.rand(2, 8), torch.rand(2, dtype=torch.float64), "top_p: float32"),
    (torch.tensor([[0.5, -0.1]]), torch.tensor([0.9]), "non-negative values without NaN, row 0"),
    (torch.tensor([[0.5, 0.5], [0.5, -0.1]]), torch.tensor([0.9, 1.0]), "non-negative values without NaN, row 1"),
    (torch.tensor([[0.5, float("nan")]]), torch.tensor([0.9]), "non-negative values without NaN, row 0"),
])
def test_bad_inputs_say_what_is_wrong(probs, top_p, message):
    with pytest.raises(RuntimeError, match=message):
        cpu.load(notice=False).top_p_threshold(probs, top_p)


def exact_draws(probs: torch.Tensor, limit: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The oracle of draw_above, in float64: the first kept index whose running sum exceeds u * total."""
    kept = probs.double() * (probs >= limit[:, None]) * (probs > 0)
    cdf = kept.cumsum(-1)
    return (cdf <= (u.double() * cdf[:, -1])[:, None]).sum(-1).clamp(max=probs.shape[1] - 1)


@pytest.mark.parametrize("make", [flat, peaked, tied, masked])
@pytest.mark.parametrize("V", [1, 7, 100, 1000, 49152])
def test_draw_above_is_the_inverse_cdf_of_the_kept_values(make, V):
    """Every draw is the oracle's for the same u (but within a rounding of a boundary between two tokens), only
    kept tokens are ever drawn, and limits of zero keep every positive value."""
    probs = make(64, V, seed=V)
    g = torch.Generator().manual_seed(V)
    limit = probs.max(-1).values * torch.rand(64, generator=g) * (torch.rand(64, generator=g) < 0.8)
    u = torch.rand(64, generator=g)
    got = cpu.load(notice=False).draw_above(probs, limit, u)
    want = exact_draws(probs, limit, u)
    assert got.dtype == torch.long and got.shape == (64,)
    picked = probs.gather(1, got[:, None])[:, 0]
    assert (picked >= limit).all() and (picked > 0).all()
    kept = probs.double() * (probs >= limit[:, None]) * (probs > 0)
    cdf = kept.cumsum(-1) / kept.sum(-1, keepdim=True)
    close = (cdf.gather(1, want[:, None])[:, 0] - u.double()).abs() < 1e-5  # u on a boundary: either side
    assert ((got == want) | close).all(), (got[got != want], want[got != want])


def test_draw_above_follows_the_kept_distribution():
    probs = torch.tensor([[0.1, 0.0, 0.2, 0.3, 0.4]]).repeat(100_000, 1)
    u = torch.rand(100_000, generator=torch.Generator().manual_seed(0))
    draws = cpu.load(notice=False).draw_above(probs, torch.full((100_000,), 0.15), u)
    freq = torch.bincount(draws, minlength=5).double() / len(draws)
    want = torch.tensor([0, 0, 0.2, 0.3, 0.4], dtype=torch.float64) / 0.9
    assert ((freq - want).abs() < 0.006).all(), freq
    ends = cpu.load(notice=False).draw_above(probs[:2], torch.zeros(2), torch.tensor([0.0, 0.9999999]))
    assert ends.tolist() == [0, 4]


@pytest.mark.parametrize("probs,limit,u,message", [
    (torch.rand(2, 8, dtype=torch.float64), torch.rand(2), torch.rand(2), "probs: contiguous float32"),
    (torch.rand(2, 8), torch.rand(3), torch.rand(2), r"limit: float32 \[rows\]"),
    (torch.rand(2, 8), torch.rand(2), torch.rand(2, 1), r"u: float32 \[rows\]"),
])
def test_draw_above_bad_inputs_say_what_is_wrong(probs, limit, u, message):
    with pytest.raises(RuntimeError, match=message):
        cpu.load(notice=False).draw_above(probs, limit, u)


def test_draw_above_marks_rows_with_nothing_to_draw():
    """-1 for a row whose limit keeps nothing, or whose values are all zero or NaN; the other rows are drawn."""
    probs = torch.tensor([[0.5, 0.2, 0.3], [0.0, 0.0, 0.0], [float("nan")] * 3, [0.5, 0.2, 0.3]])
    got = cpu.load(notice=False).draw_above(probs, torch.tensor([0.9, 0.0, 0.0, 0.4]), torch.full((4,), 0.5))
    assert got.tolist() == [-1, -1, -1, 0]


def test_penalize_gives_the_samplers_torch_bits():
    """The repetition, presence and frequency penalties in one pass equal Sampler._penalize's PyTorch ops bit for
    bit: rows from any slots, counts and prompt marks of their own, per-row penalties (1 / 0 / 0: unchanged)."""
    g = torch.Generator().manual_seed(0)
    slots_total, V, R = 9, 4099, 6
    counts = torch.randint(0, 4, (slots_total, V), generator=g, dtype=torch.int32)
    counts *= torch.rand(slots_total, V, generator=g) < 0.1
    seen = torch.rand(slots_total, V, generator=g) < 0.05
    x = torch.randn(R, V, generator=g) * 5
    slots = torch.tensor([3, 0, 8, 3, 5, 1])
    rep = torch.tensor([1.3, 0.7, 1.0, 2.0, 1.1, 1.0])
    pres = torch.tensor([0.5, -0.2, 0.0, 1.5, 0.0, 0.0])
    freq = torch.tensor([0.3, 0.1, 0.0, -0.4, 0.7, 0.0])
    c = counts[slots]
    present = c > 0
    want = torch.where(present | seen[slots], torch.where(x > 0, x / rep[:, None], x * rep[:, None]), x)
    want = want - pres[:, None] * present.to(x.dtype) - freq[:, None] * c.to(x.dtype)
    got = cpu.load(notice=False).penalize(x, counts, seen, slots, rep, pres, freq)
    assert torch.equal(got, want)
    assert torch.equal(got[5], x[5])  # no penalty: the row as it was
    with pytest.raises(RuntimeError, match="row 1 names slot 9 of 9"):
        cpu.load(notice=False).penalize(x, counts, seen, torch.tensor([0, 9, 0, 0, 0, 0]), rep, pres, freq)
    with pytest.raises(RuntimeError, match="counts: contiguous int32"):
        cpu.load(notice=False).penalize(x, counts.long(), seen, slots, rep, pres, freq)


OTHERS = [cap for cap in build.runnable_capabilities() if cap != torch.backends.cpu.get_cpu_capability()]


@pytest.mark.skipif(os.environ.get("ATEN_CPU_CAPABILITY") is not None, reason="a run under one capability")
@pytest.mark.parametrize("capability", OTHERS or [pytest.param(None, marks=pytest.mark.skip("one capability"))])
def test_every_capability_build(capability):
    """This file under each other capability's build (a skip there, for a missing build, fails here)."""
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", __file__],
                          cwd=ROOT, env={**os.environ, "ATEN_CPU_CAPABILITY": capability.lower()},
                          capture_output=True, text=True, timeout=600)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-6000:]
    assert "CPU extension not built" not in out and " passed" in out, out[-3000:]
    check = subprocess.run([sys.executable, "-c", "from mistral7b import cpu; print(cpu.load().CAPABILITY)"],
                           env={**os.environ, "ATEN_CPU_CAPABILITY": capability.lower()}, capture_output=True,
                           text=True)
    assert check.stdout.strip() == capability


@pytest.mark.parametrize("rows,vocab", [(1, 33), (7, 32), (256, 32000), (3, 49152)])
def test_masked_logits_equal_the_unpacked_mask(rows, vocab):
    """The packed grammar bitmask applied in one pass (engine/structured_output.py): x where allowed, else -inf,
    for words all set, all clear and mixed, and a vocabulary that is not a multiple of 32."""
    from mistral7b.engine.structured_output import unpack_bitmask

    g = torch.Generator().manual_seed(rows + vocab)
    words = (vocab + 31) // 32
    mask = torch.randint(-2**31, 2**31 - 1, (rows, words), generator=g, dtype=torch.int64).to(torch.int32)
    mask[0, : words // 2] = -1
    mask[-1, words // 2 :] = 0
    x = torch.randn(rows, vocab, generator=g)
    got = cpu.load().masked_logits(x, mask)
    assert torch.equal(got, x.masked_fill(~unpack_bitmask(mask, vocab), float("-inf")))
    assert got.data_ptr() != x.data_ptr()
    if words > 1:
        with pytest.raises(RuntimeError, match="words cover"):
            cpu.load().masked_logits(x, mask[:, : words - 1].contiguous())
    with pytest.raises(RuntimeError, match="int32"):
        cpu.load().masked_logits(x, mask.long())
