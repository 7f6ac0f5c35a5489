"""One step's batch as every paged attention backend reads it (vLLM's AttentionMetadata shape).

Sequences computing one token (decodes) come first: rows 0 .. num_decodes - 1 of the batch and tokens
0 .. num_decodes - 1 of the step; the prefill chunks follow. Device tensors are built without reading
anything back from the device; the host-side lengths are what the scheduler already knows.
"""

from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    num_decodes: int
    query_start_loc: torch.Tensor  # [B + 1] int32: the batch's tokens of sequence b are query_start_loc[b:b+2]
    seq_lens: torch.Tensor  # [B] int32: context lengths, this step's tokens included
    block_table: torch.Tensor  # [B, max_blocks_per_seq] int32
    slot_mapping: torch.Tensor  # [T] int64: the cache slot each new token is written to
    block_size: int
    query_lens_host: list[int]  # [B]
    seq_lens_host: list[int]  # [B]

    @property
    def num_tokens(self) -> int:
        return self.slot_mapping.shape[0]

    @property
    def max_decode_seq_len(self) -> int:
        return max(self.seq_lens_host[: self.num_decodes], default=0)

    @property
    def prefill_query_start_loc(self) -> torch.Tensor:  # [P + 1]: the prefill chunks' tokens, from 0
        return self.query_start_loc[self.num_decodes :] - self.num_decodes

    @property
    def max_prefill_query_len(self) -> int:
        return max(self.query_lens_host[self.num_decodes :], default=0)

    def split(self, sequences: int) -> tuple["AttentionMetadata", "AttentionMetadata"]:
        """(the first `sequences` sequences, the rest), each a batch of its own (decodes still first)."""
        b, t = sequences, sum(self.query_lens_host[:sequences])
        first = AttentionMetadata(min(self.num_decodes, b), self.query_start_loc[: b + 1], self.seq_lens[:b],
                                  self.block_table[:b], self.slot_mapping[:t], self.block_size,
                                  self.query_lens_host[:b], self.seq_lens_host[:b])
        second = AttentionMetadata(max(self.num_decodes - b, 0), self.query_start_loc[b:] - t, self.seq_lens[b:],
                                   self.block_table[b:], self.slot_mapping[t:], self.block_size,
                                   self.query_lens_host[b:], self.seq_lens_host[b:])
        return first, second

    def balanced_split(self) -> int:
        """The sequence boundary that splits the batch's tokens most evenly (two-batch overlap); the first part
        gets a sequence at least, if there is one."""
        total, before, best = sum(self.query_lens_host), 0, None
        for b, length in enumerate(self.query_lens_host, start=1):
            before += length
            best = min(best or (abs(total - 2 * before), b), (abs(total - 2 * before), b))
        return best[1] if best else 0

    @staticmethod
    def empty(device: torch.device, max_blocks_per_seq: int, block_size: int) -> "AttentionMetadata":
        none = torch.zeros(0, dtype=torch.int32, device=device)
        return AttentionMetadata(0, torch.zeros(1, dtype=torch.int32, device=device), none,
                                 torch.zeros(0, max_blocks_per_seq, dtype=torch.int32, device=device),
                                 none.long(), block_size, [], [])


def slots_of(block_table: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor, block_size: int) -> torch.Tensor:
    """Cache slots of positions[i] of the sequence in block_table row rows[i] (all [N], on the device)."""
    blocks = block_table[rows.long(), torch.div(positions, block_size, rounding_mode="floor").long()]
    return blocks.long() * block_size + positions.long() % block_size


def ranges_of_rows(starts: torch.Tensor, lengths: torch.Tensor, total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For ranges [starts[b], starts[b] + lengths[b]) of rows b (device tensors [B]) holding `total`
    positions in all (a host number): each position's row and the position itself, both [total]."""
    rows = torch.repeat_interleave(torch.arange(lengths.shape[0], device=lengths.device), lengths.long(),
                                   output_size=total)
    offsets = torch.cumsum(lengths.long(), 0) - lengths.long()  # [B] start of each range in the output
    positions = torch.arange(total, device=lengths.device) - offsets[rows] + starts.long()[rows]
    return rows, positions
