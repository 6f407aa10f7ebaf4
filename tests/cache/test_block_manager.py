"""The block manager's bookkeeping: window release, reference counts, prefix keys, least-recently-freed eviction."""

from __future__ import annotations

import pytest

from mistral7b.cache.block_manager import NULL_BLOCK, BlockManager, max_blocks_per_seq
from mistral7b.engine.sampling_params import SamplingParams
from mistral7b.engine.sequence import Sequence


def seq(tokens: list[int], seq_id: int = 0) -> Sequence:
    return Sequence(seq_id=seq_id, request_id=seq_id, index=0, token_ids=list(tokens), num_prompt=len(tokens),
                    params=SamplingParams(), eos_ids=frozenset(), detok=None, seed=None, arrival=0.0)


def compute(bm: BlockManager, s: Sequence, n: int) -> None:
    """What the engine does for a span: allocate, 'run', advance, commit."""
    assert bm.allocate(s, n)
    s.num_computed += n
    bm.commit(s)


def held(s: Sequence) -> list[int]:
    return [b for b in s.block_table if b != NULL_BLOCK]


def test_window_releases_blocks_that_no_later_query_can_see():
    bm = BlockManager(num_blocks=8, block_size=4, window=6, enable_prefix_caching=False)
    s = seq(list(range(40)))
    compute(bm, s, 8)  # positions 0..7: blocks 0, 1
    assert len(held(s)) == 2
    compute(bm, s, 1)  # position 8 sees 3..8: block 0 (0..3) is still needed
    assert len(held(s)) == 3 and s.first_live_block == 0
    compute(bm, s, 1)  # position 9 sees 4..9: block 0 is released
    assert s.block_table[0] == NULL_BLOCK and s.first_live_block == 1
    for _ in range(30):
        compute(bm, s, 1)
        assert len(held(s)) <= max_blocks_per_seq(10**6, 1, 4, 6) == 3
    assert bm.num_free == 8 - len(held(s))
    bm.free(s)
    assert bm.num_free == 8 and bm.usage == 0.0


def test_allocation_fails_whole_when_the_pool_is_short():
    bm = BlockManager(num_blocks=3, block_size=4, window=None)
    a, b = seq(list(range(10)), 0), seq(list(range(10)), 1)
    assert bm.allocate(a, 10)  # 3 blocks
    assert not bm.allocate(b, 1) and b.block_table == []
    bm.free(a)
    assert bm.allocate(b, 1)


def test_prefix_hits_share_blocks_and_never_the_last_token():
    bm = BlockManager(num_blocks=16, block_size=4, window=None)
    a = seq(list(range(13)))
    compute(bm, a, 13)  # 3 full blocks get keys; the partial 4th does not
    assert len(bm.cached) == 3
    b = seq(list(range(12)) + [99, 98], 1)
    assert bm.match_prefix(b) == 12 and b.block_table == a.block_table[:3]
    assert [bm.ref_count[x] for x in b.block_table] == [2, 2, 2]
    c = seq(list(range(12)), 2)  # a whole-prompt hit still recomputes its last token
    assert bm.match_prefix(c) == 8
    bm.free(a)
    bm.free(b)
    bm.free(c)
    assert bm.usage == 0.0 and len(bm.free_cached) == 3  # unreferenced but still findable
    d = seq(list(range(12)) + [5], 3)
    assert bm.match_prefix(d) == 12 and bm.num_free == 13


def test_a_different_token_anywhere_before_breaks_the_chain():
    bm = BlockManager(num_blocks=16, block_size=4, window=None)
    compute(bm, seq(list(range(13))), 13)
    other = seq([7] + list(range(1, 13)), 1)
    assert bm.match_prefix(other) == 0


def test_windowed_hit_needs_only_the_blocks_inside_the_window():
    bm = BlockManager(num_blocks=32, block_size=4, window=6)
    a = seq(list(range(30)))
    compute(bm, a, 6)
    for _ in range(24):
        compute(bm, a, 1)
    bm.free(a)
    # Evict the early blocks: take every plain free block, then the least recently freed cached ones.
    early = seq([1000 + i for i in range(4 * (bm.num_free - 5))], 9)
    assert bm.allocate(early, len(early.token_ids))
    survivors = set(bm.cached)
    b = seq(list(range(29)) + [77], 1)
    bm._hash_blocks(b, 7)
    assert b.block_hashes[0] not in survivors  # the first blocks are gone...
    got = bm.match_prefix(b)
    assert got == 28 and b.first_live_block == (28 - 6 + 1) // 4  # ...yet the hit holds: they are not needed


@pytest.mark.parametrize("tokens,chunk,block,window,expected", [
    (100, 8, 4, None, 25),  # no window: the whole sequence
    (100, 1, 4, 16, 5),  # decode: W - 1 keys before the query, over at most 5 blocks of 4
    (100, 16, 4, 16, 9),  # a chunk of 16 reaches W - 1 keys further back than its first query
    (10**6, 512, 16, 4096, 289),  # Mistral 7B with the default chunk: about (W + chunk) / B
    (10, 16, 4, 4096, 3),  # a short sequence never needs more than it has
])
def test_max_blocks_per_seq(tokens, chunk, block, window, expected):
    assert max_blocks_per_seq(tokens, chunk, block, window) == expected
