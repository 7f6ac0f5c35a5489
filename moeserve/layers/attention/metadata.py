"""One step's batch as every paged attention backend reads it (vLLM's AttentionMetadata shape).

Sequences computing one token (decodes) come first: rows 0 .. num_decodes - 1 of the batch and tokens
0 .. num_decodes - 1 of the step; the prefill chunks follow. Device tensors are built without reading
anything back from the device; the host-side lengths are what the scheduler already knows.
"""

import bisect
import itertools
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

    def split(self, tokens: int) -> tuple["AttentionMetadata", "AttentionMetadata"]:
        """(the step's first `tokens` tokens, the rest), each a batch of its own (decodes still first). A prefill chunk
        cut in two stays one sequence: its second part attends to the first through the cache, as a chunked prefill's
        next chunk does (two-batch overlap runs the first micro-batch's attention of each layer before the second's)."""
        starts = list(itertools.accumulate(self.query_lens_host, initial=0))
        rows = bisect.bisect_left(starts, tokens)  # rows with tokens in the first part
        moved = starts[rows] - tokens if rows else 0  # tokens of its last row that go to the second part
        second_row = rows - 1 if moved else rows
        first_lens, first_seqs = self.query_lens_host[:rows], self.seq_lens_host[:rows]
        first_seq_lens, first_starts = self.seq_lens[:rows], self.query_start_loc[: rows + 1]
        second_lens, second_starts = self.query_lens_host[rows:], self.query_start_loc[second_row:] - tokens
        if moved:
            first_lens = first_lens[:-1] + [first_lens[-1] - moved]
            first_seqs = first_seqs[:-1] + [first_seqs[-1] - moved]
            first_seq_lens, first_starts = first_seq_lens.clone(), first_starts.clone()
            first_seq_lens[-1] -= moved
            first_starts[-1] = tokens
            second_lens = [moved] + second_lens
            second_starts[0] = 0
        first = AttentionMetadata(min(self.num_decodes, rows), first_starts, first_seq_lens, self.block_table[:rows],
                                  self.slot_mapping[:tokens], self.block_size, first_lens, first_seqs)
        second = AttentionMetadata(max(self.num_decodes - second_row, 0), second_starts, self.seq_lens[second_row:],
                                   self.block_table[second_row:], self.slot_mapping[tokens:], self.block_size,
                                   second_lens, self.seq_lens_host[second_row:])
        return first, second

    def halving_point(self) -> int:
        """Where two-batch overlap splits the step: the sequence boundary nearest half its tokens if it lies within an
        eighth of them, else half its tokens (a prefill chunk cut in two)."""
        total = sum(self.query_lens_host)
        boundary = min(itertools.accumulate(self.query_lens_host, initial=0), key=lambda s: (abs(2 * s - total), s))
        return boundary if 4 * abs(2 * boundary - total) <= total else -(-total // 2)

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
