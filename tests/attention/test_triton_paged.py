"""The Triton backend's planning (attention/triton_paged.py); its kernels are tested against the core path
through the engine (tests/engine/test_kernel_path.py)."""

from __future__ import annotations

import pytest
import torch

from mistral7b import attention, kernels
from mistral7b.cache.paged import Span
from mistral7b.kernels.tuning import DecodeTuning
from tests.conftest import tiny_args

pytestmark = pytest.mark.skipif(not kernels.available(), reason="triton is not installed")


def backend(max_splits=32):
    args = tiny_args(window=None, n_heads=32, n_kv_heads=8)
    b = attention.build(args, 64, 16, torch.float32, "cpu", "triton", DecodeTuning(max_splits=max_splits))
    b.target_programs = 2 * 132  # an H100's
    return b


def test_split_counts_of_steps_outside_graphs_are_powers_of_two():
    """A step outside the CUDA graphs takes a power of two splits (a handful of compiled variants, not one per
    count met while serving), never more than the exact count, which graphs keep."""
    b = backend()
    seen = set()
    for rows in range(1, 40):
        for keys in (1, 31, 33, 100, 500, 777, 4096, 40000):
            exact, rounded = b.decode_splits(rows, keys), b.decode_splits(rows, keys, True)
            assert rounded & (rounded - 1) == 0 and 1 <= rounded <= exact <= 32
            assert exact < 2 * rounded  # the largest power of two not above it
            seen.add(rounded)
    assert seen == {1, 2, 4, 8, 16, 32}
    assert backend(max_splits=12).decode_splits(1, 4096, True) == 8


def test_a_mixed_step_plans_one_decode_launch_and_one_prefill_launch():
    b = backend()
    decodes = [Span(40 + i, 1, [1, 2, 3, 4], 0) for i in range(3)]
    prefill = Span(0, 37, [5, 6, 7], 0)
    meta = b.build(decodes, [prefill])
    assert meta.positions.tolist() == [[40, 41, 42, *range(37)]]
    assert meta.seq_lens.tolist() == [41, 42, 43, 37] and meta.query_start.tolist() == [0, 1, 2, 3, 40]
    decode, pre = meta.launches
    assert decode.tokens == 3 and decode.num_splits == b.decode_splits(3, 43, True)
    assert pre.tile_seq.tolist() == [3] * len(pre.tile_q) and pre.num_splits == 1
    assert meta.block_tables.shape == (4, 4) and meta.block_tables[3].tolist() == [5, 6, 7, 0]
