"""Block manager: allocation, reference counts, prefix hashing and LRU eviction."""

from moeserve.engine.block_manager import BlockManager, hash_block
from moeserve.engine.sequence import Sequence
from moeserve.sampling_params import SamplingParams


def computed(manager: BlockManager, tokens: list[int]) -> Sequence:
    """A sequence whose tokens are all in the cache, registered for reuse."""
    seq = Sequence("r", 0, tokens, SamplingParams(), max_tokens=1)
    manager.take_prefix(seq, manager.match_prefix(seq))
    manager.allocate(seq, seq.num_tokens - seq.num_computed_tokens)
    seq.num_computed_tokens = seq.num_tokens
    manager.cache_full_blocks(seq)
    return seq


def test_hashes_chain_through_the_parent():
    assert hash_block(None, [1, 2]) == hash_block(None, [1, 2])
    assert hash_block(None, [1, 2]) != hash_block(hash_block(None, [0, 0]), [1, 2])
    assert hash_block(None, [1, 23]) != hash_block(None, [12, 3])


def test_shared_prefix_is_reused_and_reference_counted():
    manager = BlockManager(num_blocks=10, block_size=4)
    first = computed(manager, list(range(10)))  # blocks: 2 full + 1 partial
    second = computed(manager, list(range(8)) + [99, 98, 97])
    assert second.block_table[:2] == first.block_table[:2]
    assert second.block_table[2] != first.block_table[2]
    assert [manager.ref_counts[b] for b in first.block_table[:2]] == [2, 2]
    assert manager.prefix_hits == 8 and manager.prefix_queries == 21
    manager.free(first)
    assert [manager.ref_counts[b] for b in second.block_table[:2]] == [1, 1]
    manager.free(second)
    assert manager.num_free_blocks == 10


def test_freed_cached_blocks_are_evicted_least_recently_used_first():
    manager = BlockManager(num_blocks=4, block_size=2)
    old = computed(manager, [1, 2, 3, 4])
    manager.free(old)
    recent = computed(manager, [5, 6, 7, 8])
    manager.free(recent)
    computed(manager, [9, 10, 11, 12])  # needs 2 blocks: takes the oldest freed ones
    assert manager.match_prefix(Sequence("r", 0, [1, 2, 3, 4, 0], SamplingParams(), 1)) == []
    assert len(manager.match_prefix(Sequence("r", 0, [5, 6, 7, 8, 0], SamplingParams(), 1))) == 2


def test_a_full_match_leaves_the_last_token_to_compute():
    manager = BlockManager(num_blocks=8, block_size=4)
    computed(manager, list(range(8)))
    again = Sequence("r", 0, list(range(8)), SamplingParams(), 1)
    assert len(manager.match_prefix(again)) == 1  # not 2: the last token's logits are needed
