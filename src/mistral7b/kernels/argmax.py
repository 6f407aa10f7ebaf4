"""Greedy picks on the GPU: the argmax of each logits row, one Triton program a row.

A greedy decode step ends with the argmax of its float32 logits. PyTorch's reduction takes a whole row in
one thread block of 512 threads that walks it in dependent steps: 8.6 us alone for one row of 32,000 on an
H200 and 12.5 us in a batch-1 step (a third of a layer's attention). One program of 16 warps loads the row
in one go and reduces it in registers: 2.9 us (bench/README.md). Rows longer than CHUNK are walked in
chunks of CHUNK. Ties go to the lowest index, as in torch.argmax; a NaN counts as +inf (torch.argmax picks the
NaN even over an earlier +inf: a row of broken logits either way).

A decode graph also has each pick written to `mirror[turn[0]]`, pinned host memory it fills in turns: the
host reads the picks there with no copy after the replay (engine/cuda_graphs.py).
"""

from __future__ import annotations

import torch

from mistral7b.kernels.paged_attention import tl, triton

CHUNK = 32768  # 32 values a thread at 16 warps: the row in registers (a module global: tests shrink it)

if triton is not None:

    @triton.jit
    def _argmax_kernel(x_ptr, out_ptr, mirror_ptr, turn_ptr, V, stride, stride_turn, BLOCK: tl.constexpr,
                       MIRROR: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        best = tl.full([], float("-inf"), tl.float32)
        best_i = tl.full([], 0, tl.int64)
        for start in range(0, V, BLOCK):
            x = tl.load(x_ptr + row * stride + start + cols, mask=start + cols < V, other=float("-inf"))
            x = tl.where(x != x, float("inf"), x.to(tl.float32))  # NaN wins, as in torch.argmax
            m = tl.max(x, 0)
            i = tl.argmax(x, 0, tie_break_left=True).to(tl.int64) + start
            # A later chunk takes over only when strictly larger, so the lowest index keeps a tie.
            take = (m > best) | (start == 0)
            best_i = tl.where(take, i, best_i)
            best = tl.where(take, m, best)
        tl.store(out_ptr + row, best_i)
        if MIRROR:
            tl.store(mirror_ptr + tl.load(turn_ptr).to(tl.int64) * stride_turn + row, best_i)


def greedy_picks(logits: torch.Tensor) -> torch.Tensor:
    """logits [n, V] -> the index of each row's largest value [n] (int64): the kernel on a GPU, else
    logits.argmax(-1)."""
    if triton is None or logits.device.type != "cuda" or logits.dim() != 2 or logits.stride(-1) != 1:
        return logits.argmax(-1)
    return argmax_rows(logits)


def argmax_rows(logits: torch.Tensor, out: torch.Tensor | None = None, mirror: torch.Tensor | None = None,
                turn: torch.Tensor | None = None) -> torch.Tensor:
    """The kernel itself (rows contiguous): logits [n, V] -> `out` [n] int64 (new if None); with `mirror`
    [turns, >= n] int64 (pinned) and `turn` [1] int32 on the device, also into mirror[turn[0], :n]."""
    n, V = logits.shape
    assert logits.stride(-1) == 1
    if out is None:
        out = torch.empty(n, dtype=torch.long, device=logits.device)
    assert out.dtype == torch.long and out.shape == (n,) and out.stride(0) == 1
    if n == 0:
        return out
    if mirror is not None:
        assert turn is not None and turn.dtype == torch.int32 and mirror.dtype == torch.long
        assert mirror.shape[1] >= n and mirror.stride(1) == 1
    block = min(triton.next_power_of_2(V), CHUNK)
    _argmax_kernel[(n,)](logits, out, mirror, turn, V, logits.stride(0), 0 if mirror is None else mirror.stride(0),
                         BLOCK=block, MIRROR=mirror is not None, num_warps=16 if n < 64 else 8)
    return out
