"""The block manager: which physical KV blocks each sequence holds, reference counts, and the prefix cache.

The KV cache is a pool of fixed-size blocks; a sequence's block table maps its logical block j (positions
j*B .. j*B+B-1) to a physical block. Block 0 of the pool is the null block: never handed out, always zero,
used to pad gathers.

Sliding window = the paper's rolling buffer at block granularity. A query at position p attends to positions
p-W+1 .. p, and a sequence's later queries only move forward, so once the next position to compute is s, every
block that ends before s-W+1 is dead for this sequence and goes back to the pool (`release_out_of_window`).
A sequence therefore holds at most about (W + chunk) / B + 2 blocks, whatever its length. Without a window,
blocks are kept until the sequence ends.

Prefix cache: every full, computed block is keyed by a hash chained over all tokens up to its end (SHA-256 of
the parent's hash and the block's tokens), so equal keys mean equal keys/values. Blocks with no reference
stay in the pool under their key (least recently freed first to go) until the space is needed. A new
sequence skips the longest prefix whose blocks *still needed* are cached: with a window only the last
ceil(W / B) or so blocks before the first computed token are needed, so the search runs over the run of
cached blocks ending there (vLLM's right-to-left search), not over the whole prefix. At least one prompt token
is always computed, since its logits give the first new token.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from typing import Protocol


class Sequence(Protocol):
    """What the block manager reads and writes of a sequence (engine/sequence.Sequence is one): its tokens,
    how many are computed and cached, and its blocks."""

    token_ids: list[int]
    num_prompt: int
    num_computed: int
    num_cached_tokens: int
    block_table: list[int]
    first_live_block: int
    block_hashes: list[bytes]
    num_committed_blocks: int

    @property
    def num_tokens(self) -> int: ...

    @property
    def num_output(self) -> int: ...

NULL_BLOCK = 0


def max_blocks_per_seq(num_tokens: int, chunk: int, block_size: int, window: int | None) -> int:
    """The most blocks a sequence of `num_tokens` tokens, computed in spans of <= `chunk`, ever holds at once."""
    whole = -(-num_tokens // block_size)
    if window is None:
        return whole
    return min(whole, (window + chunk - 2) // block_size + 2)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, window: int | None, enable_prefix_caching: bool = True):
        """`num_blocks` usable blocks: physical ids 1 .. num_blocks (the pool holds num_blocks + 1)."""
        if num_blocks < 1 or block_size < 1:
            raise ValueError("the KV cache needs at least one block of at least one token")
        self.num_blocks, self.block_size, self.window = num_blocks, block_size, window
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_count = [0] * (num_blocks + 1)
        self.block_key: list[bytes | None] = [None] * (num_blocks + 1)
        self.free_plain: list[int] = list(range(num_blocks, 0, -1))  # a stack: reuse recently freed memory
        self.free_cached: OrderedDict[int, None] = OrderedDict()  # unreferenced blocks under a key, LRU first
        self.cached: dict[bytes, int] = {}
        self.new_blocks: list[int] = []  # handed out since the last `take_new_blocks`: to be zeroed
        self.prefix_queries = 0  # prompt tokens looked up in the prefix cache
        self.prefix_hits = 0  # of which found

    # ---- pool ----------------------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self.free_plain) + len(self.free_cached)

    @property
    def usage(self) -> float:
        """Share of blocks referenced by some sequence (cached but unreferenced blocks count as free)."""
        return 1.0 - self.num_free / self.num_blocks

    def take_new_blocks(self) -> list[int]:
        blocks, self.new_blocks = self.new_blocks, []
        return blocks

    def _take(self) -> int:
        if self.free_plain:
            block = self.free_plain.pop()
        else:  # evict the least recently freed cached block
            block, _ = self.free_cached.popitem(last=False)
            del self.cached[self.block_key[block]]  # type: ignore[arg-type]
            self.block_key[block] = None
        self.ref_count[block] = 1
        self.new_blocks.append(block)
        return block

    def _release(self, block: int) -> None:
        self.ref_count[block] -= 1
        if self.ref_count[block] == 0:
            if self.block_key[block] is not None:
                self.free_cached[block] = None
            else:
                self.free_plain.append(block)

    # ---- per sequence --------------------------------------------------------------------------------
    def first_needed_block(self, position: int) -> int:
        """The first logical block that a query at `position` (or any later one) may attend to."""
        if self.window is None:
            return 0
        return max(0, position - self.window + 1) // self.block_size

    def release_out_of_window(self, seq: Sequence) -> None:
        """Give back the blocks no query from position seq.num_computed on can attend to."""
        lo = min(self.first_needed_block(seq.num_computed), len(seq.block_table))
        for j in range(seq.first_live_block, lo):
            if seq.block_table[j] != NULL_BLOCK:
                self._release(seq.block_table[j])
                seq.block_table[j] = NULL_BLOCK
        seq.first_live_block = max(seq.first_live_block, lo)

    def allocate(self, seq: Sequence, n: int) -> bool:
        """Make room for computing tokens seq.num_computed .. + n - 1; False (nothing taken) if the pool is short."""
        self.release_out_of_window(seq)
        last = (seq.num_computed + n - 1) // self.block_size
        need = last + 1 - len(seq.block_table)
        if need > self.num_free:
            return False
        for _ in range(need):
            seq.block_table.append(self._take())
        return True

    def free(self, seq: Sequence) -> None:
        """Give back every block of the sequence (finished, aborted or preempted); keys stay cached."""
        for j in range(seq.first_live_block, len(seq.block_table)):
            if seq.block_table[j] != NULL_BLOCK:
                self._release(seq.block_table[j])
        seq.block_table = []
        seq.first_live_block = 0
        seq.num_committed_blocks = 0

    # ---- prefix cache --------------------------------------------------------------------------------
    def _hash_blocks(self, seq: Sequence, upto: int) -> None:
        """Extend seq.block_hashes to the first `upto` full blocks of its tokens."""
        bs = self.block_size
        while len(seq.block_hashes) < upto:
            j = len(seq.block_hashes)
            parent = seq.block_hashes[-1] if j else b""
            tokens = array("q", seq.token_ids[j * bs : (j + 1) * bs]).tobytes()
            seq.block_hashes.append(hashlib.sha256(parent + tokens).digest())

    def match_prefix(self, seq: Sequence, compute_from: int | None = None) -> int:
        """For a sequence with nothing computed: take the cached blocks of its longest reusable prefix, set
        num_computed past it, and return the number of tokens skipped. `compute_from`: a position that must be
        computed (its logits are wanted), so no block holding it or later is skipped."""
        if not self.enable_prefix_caching or seq.num_computed or seq.block_table:
            return 0
        bs = self.block_size
        last = seq.num_tokens - 1 if compute_from is None else min(compute_from, seq.num_tokens - 1)
        limit = last // bs  # full blocks that may be skipped: the last token (or compute_from) is always computed
        self._hash_blocks(seq, limit)
        best, run = 0, 0
        for j in range(limit):
            run = run + 1 if seq.block_hashes[j] in self.cached else 0
            m = j + 1  # skip blocks 0 .. m-1: the first computed position is m * bs
            if run >= m - self.first_needed_block(m * bs):
                best = m
        self.prefix_queries += seq.num_prompt
        if best == 0:
            return 0
        lo = self.first_needed_block(best * bs)
        seq.block_table = [NULL_BLOCK] * lo
        for j in range(lo, best):
            block = self.cached[seq.block_hashes[j]]
            if self.ref_count[block] == 0:
                del self.free_cached[block]
            self.ref_count[block] += 1
            seq.block_table.append(block)
        seq.first_live_block = lo
        seq.num_committed_blocks = best
        seq.num_computed = best * bs
        hits = min(best * bs, seq.num_prompt)
        self.prefix_hits += hits
        if seq.num_output == 0:
            seq.num_cached_tokens = hits
        return best * bs

    def commit(self, seq: Sequence) -> None:
        """Offer the sequence's newly full, computed blocks to the prefix cache."""
        if not self.enable_prefix_caching:
            return
        full = seq.num_computed // self.block_size
        if full <= seq.num_committed_blocks:
            return
        self._hash_blocks(seq, full)
        for j in range(max(seq.num_committed_blocks, seq.first_live_block), full):
            block, key = seq.block_table[j], seq.block_hashes[j]
            if block != NULL_BLOCK and self.block_key[block] is None and key not in self.cached:
                self.block_key[block] = key
                self.cached[key] = block
        seq.num_committed_blocks = full
