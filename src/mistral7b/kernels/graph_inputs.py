"""A decode graph's inputs spread from the staged rows in one kernel (engine/cuda_graphs.py).

A step's inputs are staged as [rows, STAGED + blocks] int64: each row's token, position, slot, key count, then
its block table. The graph's model reads them from five buffers (int32 key counts and block tables for the
attention kernel), and five PyTorch copies and conversions cost 6.5 us of a batch-1 step on an H200, each its
own launch; this kernel does all five, one program a row.

The staged rows come in turns: `inputs` [turns, rows, width] is read at turn `turn[0]`, so a graph can read
pinned host memory the host fills in turns, with no copy before the replay. A negative token t stands for
picks[-1 - t]: the previous step's greedy pick still on the device (async scheduling).
"""

from __future__ import annotations

import torch

from mistral7b.kernels.paged_attention import tl, triton

if triton is not None:

    @triton.jit
    def _spread_kernel(inputs_ptr, turn_ptr, picks_ptr, tokens_ptr, positions_ptr, slots_ptr, seq_lens_ptr,
                       block_tables_ptr, n_blocks, stride_turn, stride_in, stride_bt, STAGED: tl.constexpr,
                       BLOCK: tl.constexpr):
        r = tl.program_id(0)
        row = inputs_ptr + tl.load(turn_ptr).to(tl.int64) * stride_turn + r * stride_in
        token = tl.load(row)
        token = tl.load(picks_ptr + (-1 - token), mask=token < 0, other=token)
        tl.store(tokens_ptr + r, token)
        tl.store(positions_ptr + r, tl.load(row + 1))
        tl.store(slots_ptr + r, tl.load(row + 2))
        tl.store(seq_lens_ptr + r, tl.load(row + 3).to(tl.int32))
        for start in range(0, n_blocks, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            ok = cols < n_blocks
            table = tl.load(row + STAGED + cols, mask=ok)
            tl.store(block_tables_ptr + r * stride_bt + cols, table.to(tl.int32), mask=ok)


def spread_inputs(inputs: torch.Tensor, turn: torch.Tensor, picks: torch.Tensor, tokens: torch.Tensor,
                  positions: torch.Tensor, slots: torch.Tensor, seq_lens: torch.Tensor, block_tables: torch.Tensor,
                  staged: int) -> None:
    """Rows of inputs[turn[0]] ([turns, b, staged + blocks] int64, on the GPU or pinned; columns token,
    position, slot, keys, then the block table from column `staged`) into tokens, positions, slots [b] (int64),
    seq_lens [b] and block_tables [b, blocks] (int32); a negative token t is replaced by picks[-1 - t]. `turn`:
    [1] int32 on the device. Each 1-D buffer contiguous, the table's rows contiguous."""
    _, b, width = inputs.shape
    n_blocks = width - staged
    assert inputs.dtype == tokens.dtype == positions.dtype == slots.dtype == picks.dtype == torch.long
    assert inputs.stride(2) == 1 and turn.dtype == torch.int32
    assert seq_lens.dtype == block_tables.dtype == torch.int32 and block_tables.shape[1] == n_blocks
    assert all(t.stride(0) == 1 for t in (tokens, positions, slots, seq_lens)) and block_tables.stride(1) == 1
    if b == 0:
        return
    _spread_kernel[(b,)](inputs, turn, picks, tokens, positions, slots, seq_lens, block_tables, n_blocks,
                         inputs.stride(0), inputs.stride(1), block_tables.stride(0), STAGED=staged,
                         BLOCK=min(triton.next_power_of_2(n_blocks), 1024))
