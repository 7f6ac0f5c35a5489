"""The paged KV cache's bookkeeping: which blocks each sequence owns (mirrored in the device block
table, one row per sequence holding blocks), reference counts, and the prefix cache (full blocks keyed
by a hash chained through their parent, evicted least recently used)."""

import hashlib
from collections import OrderedDict

import torch

from moeserve.engine.block_table import BlockTable
from moeserve.engine.sequence import Sequence


def hash_block(parent: bytes | None, token_ids: list[int]) -> bytes:
    digest = hashlib.sha256(parent or b"")
    digest.update(b",".join(str(t).encode() for t in token_ids))
    return digest.digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True, max_num_seqs: int = 256,
                 max_blocks_per_seq: int | None = None, device: torch.device | str = "cpu",
                 block_table: BlockTable | None = None):
        self.block_table = block_table or BlockTable(max_num_seqs, max_blocks_per_seq or num_blocks, device)
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.hash_of_block: list[bytes | None] = [None] * num_blocks
        self.block_of_hash: dict[bytes, int] = {}
        self.free_blocks: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # front = evicted first
        self.prefix_queries = 0  # tokens looked up in the prefix cache
        self.prefix_hits = 0  # tokens found there

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        total = -(-(seq.num_computed_tokens + num_new_tokens) // self.block_size)
        return max(0, total - len(seq.block_table))

    def update_hashes(self, seq: Sequence) -> None:
        for i in range(len(seq.block_hashes), len(seq.token_ids) // self.block_size):  # tokens whose values are known
            parent = seq.block_hashes[-1] if seq.block_hashes else None
            seq.block_hashes.append(hash_block(parent, seq.token_ids[i * self.block_size : (i + 1) * self.block_size]))

    def match_prefix(self, seq: Sequence) -> list[int]:
        """Cached blocks holding the longest full-block prefix of seq; at least one token stays to compute."""
        if not self.enable_prefix_caching:
            return []
        self.update_hashes(seq)
        blocks = []
        for block_hash in seq.block_hashes[: (seq.num_tokens - 1) // self.block_size]:
            if block_hash not in self.block_of_hash:
                break
            blocks.append(self.block_of_hash[block_hash])
        return blocks

    def num_free_among(self, blocks: list[int]) -> int:
        return sum(1 for b in blocks if self.ref_counts[b] == 0)

    def take_prefix(self, seq: Sequence, blocks: list[int]) -> None:
        """Give seq the cached blocks `match_prefix` found (counted for the hit rate)."""
        if self.enable_prefix_caching:
            self.prefix_queries += seq.num_tokens
            self.prefix_hits += len(blocks) * self.block_size
        for block in blocks:
            if self.ref_counts[block] == 0:
                del self.free_blocks[block]
            self.ref_counts[block] += 1
        seq.block_table = list(blocks)
        seq.block_row = self.block_table.assign_row()
        self.block_table.write(seq.block_row, 0, blocks)
        seq.num_computed_tokens = len(blocks) * self.block_size
        seq.num_cached_blocks = len(blocks)

    def allocate(self, seq: Sequence, num_new_tokens: int) -> None:
        if seq.block_row is None:
            seq.block_row = self.block_table.assign_row()
        start = len(seq.block_table)
        for _ in range(self.blocks_needed(seq, num_new_tokens)):
            block, _ = self.free_blocks.popitem(last=False)
            if self.hash_of_block[block] is not None:  # evict its cached contents
                del self.block_of_hash[self.hash_of_block[block]]
                self.hash_of_block[block] = None
            self.ref_counts[block] = 1
            seq.block_table.append(block)
        self.block_table.write(seq.block_row, start, seq.block_table[start:])

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Register the blocks that computing has filled, so later requests can reuse them."""
        if not self.enable_prefix_caching:
            return
        self.update_hashes(seq)
        num_full = min(seq.num_computed_tokens // self.block_size, len(seq.block_hashes))  # full and known
        for i in range(seq.num_cached_blocks, num_full):
            block, block_hash = seq.block_table[i], seq.block_hashes[i]
            if self.hash_of_block[block] is None and block_hash not in self.block_of_hash:
                self.hash_of_block[block] = block_hash
                self.block_of_hash[block_hash] = block
        seq.num_cached_blocks = max(seq.num_cached_blocks, num_full)

    def free(self, seq: Sequence) -> None:
        """Release seq's blocks; its last blocks become the first evicted (least likely to be shared)."""
        for block in reversed(seq.block_table):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free_blocks[block] = None
        seq.block_table = []
        seq.num_computed_tokens = 0
        seq.num_cached_blocks = 0
        if seq.block_row is not None:
            self.block_table.release_row(seq.block_row)
            seq.block_row = None
