"""The stall counters (server/pauses.py): garbage-collection pauses of a process, the CUDA allocator's retries."""

from __future__ import annotations

import gc

import torch

from mistral7b.server import pauses


def test_gc_pauses_add_up_and_install_is_once():
    counter = pauses.install()
    assert pauses.install() is counter and gc.callbacks.count(counter._callback) == 1
    before = pauses.gc_seconds()
    junk = [[i] for i in range(200_000)]  # a collection with something to walk
    gc.collect()
    del junk
    assert pauses.gc_seconds() > before and counter.longest > 0


def test_alloc_retries_read_one_time_in_sixteen_and_zero_on_a_cpu():
    reads = pauses.AllocRetries(torch.device("cpu"))
    assert [reads.read() for _ in range(40)] == [0] * 40 and reads.calls == 40
