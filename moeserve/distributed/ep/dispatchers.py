"""Expert-parallel dispatchers: the Dispatcher interface of layers/moe/dispatch.py across ranks.

`all_to_all`: split sizes are exchanged first (a host sync), then one `all_to_all_single` of byte
rows. A token goes once to each rank that holds at least one of its experts, as one row of
[token payload (token format) | K local expert slots (int32, -1: not here) | K routing weights (fp32)];
the receiver's experts return each row's weighted sum over its experts there, and one row goes back
(in the activation dtype), so combine traffic is per rank, not per expert. `allgather`: all tokens to
all ranks, local experts on everything, reduce-scatter back: the simple baseline. Any rank may send
or receive nothing.
"""

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from moeserve.distributed.ep.token_formats import as_row_bytes, token_format
from moeserve.distributed.layout import ExpertMap
from moeserve.kernels.row_layout import RowLayout
from moeserve.layers.moe.dispatch import Dispatcher


class ExpertParallelDispatcher(Dispatcher):
    def __init__(self, expert_map: ExpertMap, group, ep_rank: int, dispatch_format: str, device, dtype):
        self.replica_slots, self.replica_count = expert_map.tensors(device)  # [E, ep], [E]
        self.slots_per_rank = expert_map.slots_per_rank
        self.expert_map = expert_map
        self.ep_rank = ep_rank
        self.group = group
        self.ep = expert_map.num_ranks
        self.format = token_format(dispatch_format, dtype)

    def move_experts(self, expert_map: ExpertMap) -> None:
        """A balancer's new map, written into the same tables (a captured step keeps reading them)."""
        if (expert_map.num_ranks, expert_map.slots_per_rank) != (self.ep, self.slots_per_rank):
            raise ValueError(f"a new expert map must keep {self.slots_per_rank} slots on each of {self.ep} ranks, "
                             f"got {expert_map.slots_per_rank} on {expert_map.num_ranks}")
        slots, counts = expert_map.tensors(self.replica_slots.device)
        self.replica_slots.copy_(slots)
        self.replica_count.copy_(counts)
        self.expert_map = expert_map

    def place(self, topk_ids: torch.Tensor, first_token: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """[T, K] logical experts -> (EP rank, local slot) of the replica each token uses: token t takes replica
        (t + first_token + ep_rank) mod count, so a hot expert's tokens spread evenly over its replicas."""
        token = torch.arange(topk_ids.shape[0], device=topk_ids.device)[:, None] + first_token + self.ep_rank
        physical = self.replica_slots[topk_ids, token % self.replica_count[topk_ids]]
        return physical // self.slots_per_rank, physical % self.slots_per_rank

    def unpack_rows(self, rows: torch.Tensor, hidden: int, top_k: int, dtype: torch.dtype,
                    rows_in_use: torch.Tensor | None = None):
        """Byte rows [token payload | K int32 | K fp32 | any padding] -> (tokens [R, H] as the format hands them on
        (FP8: Fp8Activations, NVFP4: Nvfp4Activations), int32 [R, K], fp32 [R, K]). rows_in_use: which rows hold a
        token (a conversion of the rows may skip the others)."""
        token_bytes = self.format.payload_bytes(hidden)
        tokens = self.format.receive(rows[:, :token_bytes], hidden, dtype, rows_in_use)
        ints = rows[:, token_bytes : token_bytes + 4 * top_k].contiguous().view(torch.int32)
        floats = rows[:, token_bytes + 4 * top_k : token_bytes + 8 * top_k].contiguous().view(torch.float32)
        return tokens, ints, floats


@dataclass
class AllToAllHandle:
    send_token_index: torch.Tensor  # [S] token of each sent row, rows ordered by destination rank
    send_counts: list[int]
    recv_counts: list[int]
    num_tokens: int
    dtype: torch.dtype


class AllToAllDispatcher(ExpertParallelDispatcher):
    def exchange_counts(self, send_counts: torch.Tensor) -> tuple[list[int], list[int]]:
        """(rows this rank sends to each rank, rows it receives from each): one host sync for both."""
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=self.group)
        send, recv = torch.stack((send_counts, recv_counts)).tolist()
        return send, recv

    def dispatch(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor):
        # x: [T, H]; topk_ids, topk_weights: [T, K]
        hidden, top_k = x.shape[1], topk_ids.shape[1]
        destination, local_slot = self.place(topk_ids)  # [T, K] each
        goes_to = F.one_hot(destination, self.ep).amax(dim=1).bool()  # [T, ep]
        send_counts, recv_counts = self.exchange_counts(goes_to.sum(dim=0))  # the one host sync
        # the (rank, token) pairs to send, sorted by destination: a stable sort puts the set flags first, in
        # order, and their number is known from the counts (nonzero would sync again)
        flags = goes_to.T.reshape(-1)
        pairs = torch.argsort((~flags).to(torch.uint8), stable=True)[: sum(send_counts)]
        rank_of_row, token_of_row = pairs // x.shape[0], pairs % x.shape[0]
        here = destination[token_of_row] == rank_of_row[:, None]  # [S, K]
        slots = torch.where(here, local_slot[token_of_row], -1).to(torch.int32)
        weights = torch.where(here, topk_weights[token_of_row].float(), 0.0)
        payload = torch.cat((self.format.pack(x[token_of_row]), as_row_bytes(slots), as_row_bytes(weights)), dim=1)
        received = payload.new_empty(sum(recv_counts), payload.shape[1])
        dist.all_to_all_single(received, payload, recv_counts, send_counts, group=self.group)
        recv_x, recv_slots, recv_weights = self.unpack_rows(received, hidden, top_k, x.dtype)
        handle = AllToAllHandle(token_of_row, send_counts, recv_counts, x.shape[0], x.dtype)
        return recv_x, RowLayout(recv_slots, recv_weights), handle

    def combine(self, y: torch.Tensor, handle: AllToAllHandle) -> torch.Tensor:
        # y: [R, H] each received row's weighted sum over the experts here -> back to [T, H]
        back = y.new_empty(sum(handle.send_counts), y.shape[1], dtype=handle.dtype)
        dist.all_to_all_single(back, y.to(handle.dtype).contiguous(), handle.send_counts, handle.recv_counts,
                               group=self.group)
        out = torch.zeros(handle.num_tokens, y.shape[1], dtype=torch.float32, device=y.device)
        out.index_add_(0, handle.send_token_index, back.float())
        return out.to(handle.dtype)


@dataclass
class AllGatherHandle:
    padded_tokens: int  # tokens per rank after padding
    num_tokens: int
    dtype: torch.dtype


def gather_padded(rows: torch.Tensor, padded: int, group) -> torch.Tensor:
    """Every rank's rows, each padded to `padded` rows, concatenated in rank order."""
    rows = F.pad(rows, (0, 0, 0, padded - rows.shape[0])).contiguous()
    out = rows.new_empty(dist.get_world_size(group) * padded, rows.shape[1])
    dist.all_gather_into_tensor(out, rows, group=group)
    return out


class AllGatherDispatcher(ExpertParallelDispatcher):

    def dispatch(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor):
        sizes = torch.tensor([x.shape[0]], device=x.device).repeat(self.ep)
        dist.all_to_all_single(sizes, sizes.clone(), group=self.group)  # every rank's token count
        padded = max(sizes.tolist())
        hidden, top_k = x.shape[1], topk_ids.shape[1]
        meta = torch.cat((as_row_bytes(topk_ids.to(torch.int32)), as_row_bytes(topk_weights.float())), dim=1)
        gathered = gather_padded(torch.cat((self.format.pack(x), meta), dim=1), padded, self.group)
        all_x, ids, weights = self.unpack_rows(gathered, hidden, top_k, x.dtype)
        ids = ids.long()
        is_real = (torch.arange(padded, device=x.device) < sizes[:, None]).flatten()  # padding rows: no experts
        destination, local_slot = self.place(ids, first_token=-self.ep_rank)  # the same choice on every rank
        here = is_real[:, None] & (destination == self.ep_rank)
        slots = torch.where(here, local_slot, -1)
        return all_x, RowLayout(slots, weights), AllGatherHandle(padded, x.shape[0], x.dtype)

    def combine(self, y: torch.Tensor, handle: AllGatherHandle) -> torch.Tensor:
        # y: [ep * padded, H] this rank's partial sums for every gathered token -> summed, this rank's share
        mine = y.new_empty(handle.padded_tokens, y.shape[1], dtype=handle.dtype)
        dist.reduce_scatter_tensor(mine, y.to(handle.dtype).contiguous(), group=self.group)
        return mine[: handle.num_tokens]


DISPATCHERS = {"all_to_all": AllToAllDispatcher, "allgather": AllGatherDispatcher}
