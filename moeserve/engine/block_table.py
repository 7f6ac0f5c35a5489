"""The block table on the device: one persistent int32 row of block ids per running sequence.

The block manager writes a sequence's new blocks into its row on the host; `sync` copies the rows that
changed to the device in one non-blocking copy through pinned staging memory, so a step never rebuilds
or re-sends the whole table and never waits for the copy. Rows are handed out when a sequence gets its
first blocks and taken back when it frees them (finished or preempted).

With a padding block, one more row (`padding_row`) points only at it: the rows that pad a batch to a
captured CUDA-graph size read and write there, never in a sequence's blocks.
"""

import torch

from moeserve.engine.staging import HostToDevice


class BlockTable:
    def __init__(self, max_num_seqs: int, max_blocks_per_seq: int, device: torch.device,
                 padding_block: int | None = None):
        self.max_blocks_per_seq = max_blocks_per_seq
        self.device = torch.device(device)
        num_rows = max_num_seqs + (padding_block is not None)
        self.host = torch.zeros(num_rows, max_blocks_per_seq, dtype=torch.int32)
        self.host_view = self.host.numpy()  # element writes without a torch call each
        on_gpu = self.device.type == "cuda"
        self.table = self.host if not on_gpu else torch.zeros_like(self.host, device=self.device)  # [R, M]
        self.staging = HostToDevice((num_rows, max_blocks_per_seq + 1), torch.int32, self.device)  # [row | blocks]
        self.free_rows = list(range(max_num_seqs - 1, -1, -1))
        self.dirty: set[int] = set()
        self.padding_row = max_num_seqs if padding_block is not None else None
        if padding_block is not None:
            self.write(self.padding_row, 0, [padding_block] * max_blocks_per_seq)

    def assign_row(self) -> int:
        if not self.free_rows:
            raise RuntimeError(f"the block table has rows for {self.host.shape[0]} sequences; all are in use")
        return self.free_rows.pop()

    def release_row(self, row: int) -> None:
        self.dirty.discard(row)
        self.free_rows.append(row)

    def write(self, row: int, start: int, blocks: list[int]) -> None:
        """Blocks start .. start + len(blocks) - 1 of the row's sequence."""
        if start + len(blocks) > self.max_blocks_per_seq:
            raise RuntimeError(f"a sequence needs {start + len(blocks)} blocks; the table holds "
                               f"{self.max_blocks_per_seq} per sequence (max_model_len / block_size)")
        self.host_view[row, start : start + len(blocks)] = blocks
        if self.table is not self.host:
            self.dirty.add(row)

    def sync(self) -> None:
        """Send the rows written since the last sync to the device (no host wait for the copy)."""
        if not self.dirty:
            return
        rows = sorted(self.dirty)
        self.dirty.clear()
        staged = self.staging.writable()[: len(rows)]
        staged[:, 0] = rows
        staged[:, 1:] = self.host_view[rows]
        on_device = self.staging.send(len(rows))
        self.table[on_device[:, 0].long()] = on_device[:, 1:]
