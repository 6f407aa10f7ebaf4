"""The extension's thread pool (mistral7b/cpu/threads.cpp), its vectorised argmax, and the engine's thread
scope for decode steps (cpu.decode_threads): every kernel result is the same whoever runs its tasks."""

from __future__ import annotations

import os
import signal
import threading
import time

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


@pytest.mark.skipif(not hasattr(os, "fork") or not os.path.isdir("/proc/self/task"), reason="needs fork, /proc")
def test_a_forked_child_starts_a_pool_of_its_own():
    """The parent's helpers do not exist in a forked child, and a lock one of them held at the fork would stay held:
    the child gets a fresh pool, with helpers of its own. ATen's OpenMP pool is not fork-safe (a parallel ATen op
    in the child waits forever for the parent's OpenMP threads), so the child holds ATen to one thread and gives
    the extension's pool two; a child that does not finish in 60 s fails the test instead of hanging the run."""
    layer, x = layer_and_input()
    want = layer(x)  # the pool and its helpers exist in the parent now
    time.sleep(0.01)  # the helpers asleep at the fork: the child must not wait on their condition variable
    pid = os.fork()
    if pid == 0:
        try:
            torch.set_num_threads(1)
            cpu.load().set_threads(2)
            ok = all(torch.equal(layer(x), want) for _ in range(20))
            helpers = len(os.listdir("/proc/self/task")) > 1  # the child's own helper thread
            os._exit(0 if ok and helpers else 1 if not ok else 2)
        finally:
            os._exit(3)
    deadline = time.monotonic() + 60
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    if done[0] == 0:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pytest.fail("the forked child hung")
    assert os.waitstatus_to_exitcode(done[1]) == 0, "1: wrong result, 2: no helper thread, 3: an error"


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
