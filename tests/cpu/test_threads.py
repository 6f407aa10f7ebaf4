"""The extension's thread pool (mistral7b/cpu/threads.cpp), its vectorised argmax, and the engine's thread
scope for decode steps (cpu.decode_threads): every kernel result is the same whoever runs its tasks."""

from __future__ import annotations

import os
import threading

import pytest
import torch

from mistral7b import cpu
from mistral7b.model.quantize import Int4Linear

pytestmark = pytest.mark.skipif(cpu.load(notice=False) is None, reason="CPU extension not built")


def layer_and_input(seed=0):
    g = torch.Generator().manual_seed(seed)
    layer = Int4Linear.from_float(torch.randn(1000, 576, generator=g), 32, torch.float32)
    return layer, torch.randn(3, 576, generator=g)


def test_same_bits_with_any_thread_count():
    layer, x = layer_and_input()
    ops = cpu.load()
    want = layer(x)
    try:
        for n in (1, 2, 3, 8):  # more threads than cores: helpers share them
            ops.set_threads(n)
            assert torch.equal(layer(x), want)
    finally:
        ops.set_threads(0)


def test_concurrent_callers_get_their_own_results():
    """A job arriving while the pool runs another (another Python thread: the GIL is released in the op)
    runs inline on its caller."""
    layers = [layer_and_input(seed) for seed in range(4)]
    want = [layer(x) for layer, x in layers]
    got: dict[int, list[torch.Tensor]] = {i: [] for i in range(4)}

    def run(i):
        layer, x = layers[i]
        for _ in range(50):
            got[i].append(layer(x))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(4):
        assert all(torch.equal(y, want[i]) for y in got[i])


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_runs_without_the_helpers():
    """The helpers are threads of the parent: in a child the caller takes every task itself."""
    layer, x = layer_and_input()
    want = layer(x)  # the pool and its helpers exist in the parent now
    pid = os.fork()
    if pid == 0:
        ok = torch.equal(layer(x), want)
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_decode_threads_keeps_the_pool_and_restores_torch():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    layer, x = layer_and_input()
    want = layer(x)
    try:
        with cpu.decode_threads():
            assert torch.get_num_threads() == 1
            assert torch.equal(layer(x), want)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("shape", [(1, 49152), (3, 100), (5, 7), (2, 33), (7, 4097)])
def test_argmax_rows_is_torch_argmax(shape):
    g = torch.Generator().manual_seed(shape[1])
    ops = cpu.load()
    for _ in range(5):
        x = torch.randn(*shape, generator=g)
        assert torch.equal(ops.argmax_rows(x), x.argmax(-1))
    ties = torch.randint(0, 3, shape, generator=g).float()  # the first of equal maxima
    assert torch.equal(ops.argmax_rows(ties), ties.argmax(-1))
    wide = torch.randn(shape[0], 2 * shape[1], generator=g)[:, ::2]  # rows with a stride
    assert torch.equal(ops.argmax_rows(wide[:, : shape[1]].contiguous()), wide.argmax(-1))


def test_argmax_rows_nan_and_infinities():
    x = torch.randn(4, 500, generator=torch.Generator().manual_seed(1))
    x[0, 17] = x[0, 300] = float("nan")  # torch: the first NaN
    x[1] = float("-inf")
    x[2, 499] = float("nan")
    x[3, 250] = float("inf")
    assert torch.equal(cpu.load().argmax_rows(x), x.argmax(-1))
    with pytest.raises(RuntimeError, match="float32"):
        cpu.load().argmax_rows(x.double())
