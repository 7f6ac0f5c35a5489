"""The device side of one rank, in the order nano-vllm's ModelRunner has it: load the model and prepare its
weights, size and allocate the KV cache, capture the decode CUDA graphs. Then one step at a time: lay out the
batch (decodes first), send its token ids, positions and attention metadata to persistent device buffers in
one non-blocking copy, run the forward (a graph replay when the step is decodes only), sample the sequences
whose tokens are all computed, and gather prompt logprobs when asked.

The sampled ids stay on the device (a PendingOutput the engine reads when it needs them): under async
scheduling the next step is launched first, and a sequence's pending token, the one it computes next, is
taken from the previous step's ids on the device, by one gather and scatter before the forward."""

import logging
from dataclasses import dataclass

import torch

from moeserve.config import ModelConfig
from moeserve.distributed.launch import DistributedContext, resolve_device
from moeserve.distributed.ep.rebalance import ExpertBalancer, ep_nodes, expert_dispatcher, placement_of
from moeserve.distributed.eplb import imbalance, rank_load
from moeserve.distributed.layout import ParallelLayout
from moeserve.distributed.ep.peer_to_peer import PeerToPeerRank, PeerTransport
from moeserve.distributed.parallelize import ParallelOptions
from moeserve.engine.args import EngineArgs
from moeserve.engine.block_table import BlockTable
from moeserve.engine.cuda_graphs import DecodeGraphs, graph_sizes
from moeserve.engine.kv_cache import allocate_kv_cache, cache_dtype
from moeserve.engine.memory import plan_num_blocks
from moeserve.engine.plan import ep_tokens_per_rank
from moeserve.engine.sequence import Sequence
from moeserve.engine.staging import HostToDevice
from moeserve.layers.attention.backend import paged_attention_backend
from moeserve.layers.attention.metadata import AttentionMetadata, slots_of
from moeserve.layers.attention.mla import prepare_absorbed_weights
from moeserve.layers.moe.moe import MoE
from moeserve.layers.rotary import prepare_rotary_tables
from moeserve.layers.sampler import PendingOutput, Sampler, token_logprobs
from moeserve.layers.sampling_state import upload
from moeserve.loader.build import build_model
from moeserve.loader.model_loader import load_model
from moeserve.loader.random_init import random_init
from moeserve.models.base import CausalLM, fuse_projections
from moeserve.quant.apply import describe_weight_bytes, quantize_model
from moeserve.sampling_params import Logprob

logger = logging.getLogger(__name__)


@dataclass
class StepResult:
    sampled: list[Sequence]  # sequences that got a new token, in the order of `output`'s rows
    output: PendingOutput | None  # None when no sequence got one
    prompt_logprobs: dict[int, list[tuple[int, dict[int, Logprob]]]]  # id(seq) -> [(prompt index, entry)]


class StepInputs:
    """A step's [real tokens 1 | ids T | positions T | batch row of each token T | query_start_loc B+1 | seq_lens B |
    table rows B] (int32), written in pinned memory and sent in one non-blocking copy into a persistent device buffer:
    a captured graph reads its batch size's fields at the same addresses every replay. Behind them, for the
    pending tokens among the ids: [their places in ids P | their rows in the previous step's sampled ids P].
    real_tokens: how many of the ids are a sequence's (a captured batch's padding rows follow them)."""

    def __init__(self, max_tokens: int, max_seqs: int, device: torch.device):
        size = 1 + 3 * max_tokens + 5 * max_seqs + 1
        self.staging = HostToDevice((size,), torch.int32, device)
        self.on_device = torch.zeros(size, dtype=torch.int32, device=device)
        self.real_tokens = self.on_device[:1]

    def send(self, ids, positions, token_rows, query_start_loc, seq_lens, rows, pending=(), previous_ids=None,
             real_tokens: int | None = None) -> None:
        """pending: (place in ids, row in previous_ids) of each id whose value only the device has; real_tokens:
        the ids that are not padding (default: all)."""
        places, sources = [1 + place for place, _ in pending], [source for _, source in pending]  # on_device's
        real = len(ids) if real_tokens is None else real_tokens
        packed = [real] + ids + positions + token_rows + query_start_loc + seq_lens + rows + places + sources
        self.staging.writable()[: len(packed)] = packed
        self.staging.send(len(packed), into=self.on_device)
        if pending:
            start = len(packed) - 2 * len(pending)
            places_d, sources_d = self.on_device[start : len(packed)].long().split(len(pending))
            self.on_device.index_copy_(0, places_d, previous_ids[sources_d].to(torch.int32))

    def fields(self, num_tokens: int, batch: int) -> list[torch.Tensor]:
        fields = self.on_device[1 : 2 + 3 * num_tokens + 3 * batch]  # after the real-token count
        return list(fields.split([num_tokens] * 3 + [batch + 1, batch, batch]))


class ModeMismatch(RuntimeError):
    """A rank's step contradicts the EP exchange mode every rank agreed on."""


class ModelRunner:
    def __init__(self, args: EngineArgs, config: ModelConfig, max_model_len: int, eos_token_ids: tuple[int, ...],
                 context: DistributedContext | None = None):
        self.device = torch.device(resolve_device(args.device))
        self.dtype = getattr(torch, config.dtype if args.dtype == "auto" else args.dtype)
        self.config, self.max_model_len, self.eos_token_ids = config, max_model_len, eos_token_ids
        self.model = self.load_model(args, context)
        self.model.model.micro_batches = args.micro_batches  # eager forwards; graphs are captured as one
        self.ep_transport = self.prepare_ep_transport()
        fuse_projections(self.model)
        prepare_absorbed_weights(self.model, self.dtype)
        if self.device.type == "cuda":
            prepare_rotary_tables(self.model, max_model_len, self.device)
        self.kv_cache_dtype = cache_dtype(args.kv_cache_dtype, self.dtype)
        self.num_blocks = self.plan_cache(args, context)
        tp = context.groups.layout.tp if context is not None else 1
        # one block more than the block manager hands out: the rows that pad a graph's batch write there
        kv_caches, kv_scales = allocate_kv_cache(config, self.num_blocks + 1, args.block_size, self.kv_cache_dtype,
                                                 self.device, tp)
        self.block_size = args.block_size
        self.block_table = BlockTable(args.max_num_seqs, -(-max_model_len // args.block_size), self.device,
                                      padding_block=self.num_blocks)
        self.attention = paged_attention_backend(args.attention_backend, self.device, kv_caches, kv_scales)
        self.sampler = Sampler(config.vocab_size, self.device, args.seed, max_rows=args.max_num_seqs)
        self.inputs = StepInputs(args.max_num_batched_tokens, args.max_num_seqs, self.device)
        for _, moe in self.moe_layers():  # the expert-load metric counts a step's real tokens, not its padding
            moe.real_tokens = self.inputs.real_tokens
        self.empty_steps = 0  # forwards over no tokens, run to keep other ranks' collectives going
        self.previous_rows: dict[Sequence, int] = {}  # the last step's sampled sequences -> their rows in:
        self.previous_ids: torch.Tensor | None = None  # its sampled ids [S], on the device
        self.graphs = self.capture_graphs(args, context)
        self.reset_expert_load()  # the memory profile and graph capture routed dummy tokens
        self.balancer = None
        if context is not None and args.eplb_interval:
            self.balancer = ExpertBalancer(self.model, context.groups.ep_group, context.groups.ep_rank,
                                           args.eplb_interval, self.device, ep_nodes(context.groups.layout.ep))

    def load_model(self, args: EngineArgs, context: DistributedContext | None) -> CausalLM:
        parallel = None
        if context is not None:
            tokens = ep_tokens_per_rank(args.max_num_batched_tokens, self.max_model_len, context.groups.layout.tp,
                                        args.ep_max_tokens_per_rank)
            # a p2p transport (if the backend resolves to one) also gets buffers for graphed decode steps
            graphs = self.device.type == "cuda" and not args.enforce_eager and args.attention_backend != "torch"
            parallel = ParallelOptions(context.groups, args.ep_dispatch_format, args.ep_backend, args.num_redundant_experts,
                                       tokens, args.dist_timeout, max(graph_sizes(args)) if graphs else None,
                                       args.micro_batches, args.ep_comm_sms)
        if args.load_format != "dummy":
            return load_model(args.model, self.dtype, self.device, quantization=args.quantization, parallel=parallel)
        model = build_model(self.config, self.dtype, self.device, parallel=parallel)
        random_init(model, args.seed)
        if args.quantization:
            quantize_model(model, args.quantization)
        logger.info("Random weights (load_format=dummy) on %s: %s", self.device, describe_weight_bytes(model))
        return model

    def prepare_ep_transport(self) -> PeerTransport | None:
        """The p2p EP transport the MoE layers share, its buffers made now on every rank (before the KV cache takes
        the memory); None with another EP backend or none."""
        for _, moe in self.moe_layers():
            dispatcher = expert_dispatcher(moe)
            if isinstance(dispatcher, PeerToPeerRank) and dispatcher.transport is not None:
                dispatcher.prepare_transport(self.config.hidden_size, self.config.moe.top_k, self.dtype, self.device)
                return dispatcher.transport
        return None

    @property
    def low_latency_ep(self) -> bool:
        """Whether EP runs over a p2p transport with low-latency buffers, so decode steps can replay graphs."""
        return self.ep_transport is not None and self.ep_transport.low_latency_tokens is not None

    def set_ep_low_latency(self, low_latency: bool) -> None:
        """The exchange mode of the coming forwards, which every EP rank sets alike (the lockstep's agreement):
        low latency (decode batches replayed as CUDA graphs) or high throughput (eager)."""
        if self.ep_transport is not None and self.graphs is not None:
            self.ep_transport.low_latency = low_latency

    def moe_layers(self) -> list[tuple[int, MoE]]:
        """(layer index, its MoE) of each MoE layer."""
        return [(index, layer.mlp) for index, layer in enumerate(self.model.model.layers) if isinstance(layer.mlp, MoE)]

    def reset_expert_load(self) -> None:
        """Routed-token counts back to zero, in place (captured graphs add to these tensors)."""
        for _, moe in self.moe_layers():
            if moe.routed_tokens is not None:
                moe.routed_tokens.zero_()

    def expert_load(self) -> dict[int, list[int]]:
        """Tokens routed to each expert so far, per MoE layer: layer index -> counts [E] (reads the device)."""
        return {index: moe.expert_tokens.tolist() for index, moe in self.moe_layers()}

    def expert_imbalance(self) -> dict[int, float]:
        """Per MoE layer: max over mean of the tokens its EP ranks computed so far (tokens of an expert with
        replicas split evenly over them); 1.0 without expert parallelism."""
        result = {}
        for index, moe in self.moe_layers():
            dispatcher = expert_dispatcher(moe)
            if dispatcher is None:
                result[index] = 1.0
                continue
            load = moe.expert_tokens.cpu().double()[None]
            result[index] = float(imbalance(rank_load(load, placement_of([dispatcher.expert_map])))[0])
        return result

    def plan_cache(self, args: EngineArgs, context: DistributedContext | None) -> int:
        layout = context.groups.layout if context is not None else ParallelLayout()
        graphs = self.device.type == "cuda" and not args.enforce_eager and (layout.ep == 1 or self.low_latency_ep)
        num_blocks = plan_num_blocks(self.model, args, self.max_model_len, self.kv_cache_dtype, self.device, layout,
                                     max(graph_sizes(args)) if graphs else 0, self.dtype)
        if context is not None:  # the TP ranks of a DP group must schedule alike: every rank takes the smallest
            smallest = torch.tensor([num_blocks])
            torch.distributed.all_reduce(smallest, op=torch.distributed.ReduceOp.MIN, group=context.control)
            num_blocks = int(smallest)
        return num_blocks

    def capture_graphs(self, args: EngineArgs, context: DistributedContext | None) -> DecodeGraphs | None:
        why_not = None
        if self.device.type != "cuda":
            why_not = "not on CUDA"
        elif args.enforce_eager:
            why_not = "enforce_eager"
        elif type(self.attention).__name__ != "TritonPagedAttention":
            why_not = f"the {args.attention_backend} attention backend gathers whole contexts per step"
        elif context is not None and context.groups.layout.ep > 1 and not self.low_latency_ep:
            why_not = "expert-parallel dispatch over NCCL sizes its all-to-all on the host (the p2p backend does not)"
        if why_not is not None:
            if self.device.type == "cuda":
                logger.info("CUDA graphs off (%s): every step runs eagerly", why_not)
            return None
        graphs = DecodeGraphs(graph_sizes(args))
        if self.ep_transport is not None:  # graphed steps exchange in low-latency mode; eager ones in high-throughput
            self.ep_transport.low_latency = True
        micro_batches, self.model.model.micro_batches = self.model.model.micro_batches, 1
        try:
            graphs.capture(self.graph_forward, self.send_padding, self.device)
        finally:
            self.model.model.micro_batches = micro_batches
            if self.ep_transport is not None:
                self.ep_transport.low_latency = False
        return graphs

    def graph_size_for(self, scheduled: list[tuple[Sequence, int]]) -> int | None:
        """The graph this step replays, or None (eager). Under the p2p EP backend the ranks' agreed mode decides: a
        low-latency step must replay (every rank's exchange is fixed-size), a high-throughput one runs eagerly."""
        if self.graphs is None:
            return None
        size = self.graphs.size_for(len(scheduled)) if self.decodes_only(scheduled) else None
        if self.ep_transport is None:
            return size
        if self.ep_transport.low_latency and size is None:
            raise ModeMismatch(f"the EP ranks agreed on a low-latency (CUDA graph) step, but this rank's step of "
                               f"{len(scheduled)} sequences is not a decode batch within the graphs (up to "
                               f"{self.graphs.sizes[-1]}): the lockstep's decode prediction was wrong")
        return size if self.ep_transport.low_latency else None

    # Steps

    @torch.no_grad()
    def execute_empty(self) -> None:
        """A forward with no work of this rank's: what a rank with nothing to do runs, so that collectives
        inside the model (tensor-parallel reductions, MoE dispatch) find every rank. With graphs, the
        smallest graph over padding rows only."""
        self.empty_steps += 1
        if self.balancer is not None:
            self.balancer.before_forward()
        if self.graphs is not None and (self.ep_transport is None or self.ep_transport.low_latency):
            size = self.graphs.sizes[0]
            self.send_padding(size)
            self.graphs.replay(size)
            return
        empty = torch.zeros(0, dtype=torch.long, device=self.device)
        metadata = AttentionMetadata.empty(self.device, self.block_table.max_blocks_per_seq, self.block_size)
        self.model.model(empty, empty, self.attention.bind(metadata))

    @torch.no_grad()
    def execute(self, scheduled: list[tuple[Sequence, int]]) -> StepResult:
        if self.balancer is not None:
            self.balancer.before_forward()
        scheduled = sorted(scheduled, key=lambda item: item[1] != 1)  # decodes first (a stable sort)
        try:
            graph_size = self.graph_size_for(scheduled)
        except ModeMismatch:
            self.execute_empty()  # the other ranks' exchanges still find this one; then this rank fails the step
            raise
        if graph_size is not None:
            self.send(scheduled, pad_to=graph_size)
            logits = self.graphs.replay(graph_size)[: len(scheduled)]
            sampled = [seq for seq, _ in scheduled]
            return StepResult(sampled, self.sample(logits, sampled), {})
        self.send(scheduled)
        ids, positions, metadata = self.device_batch(sum(n for _, n in scheduled), [n for _, n in scheduled],
                                                     [seq.num_computed_tokens + n for seq, n in scheduled])
        hidden = self.model.model(ids, positions, self.attention.bind(metadata))  # [T, H]
        sample_rows, sampled, prompt_rows = [], [], []
        offset = 0
        for seq, num_new in scheduled:
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + num_new
            if end == seq.num_tokens:
                sample_rows.append(offset + num_new - 1)
                sampled.append(seq)
            if seq.params.prompt_logprobs is not None:
                # the logits at position p score prompt token p + 1
                prompt_rows += [(seq, offset + p - start, p + 1) for p in range(start, min(end, seq.num_prompt_tokens - 1))
                                if p + 1 >= len(seq.prompt_logprobs)]
            offset += num_new
        output, self.previous_rows = None, {}
        if sampled:
            logits = self.model.compute_logits(hidden[upload(sample_rows, torch.long, self.device)])
            output = self.sample(logits, sampled)
        return StepResult(sampled, output, self.prompt_logprobs(hidden, ids, prompt_rows))

    def sample(self, logits: torch.Tensor, sampled: list[Sequence]) -> PendingOutput:
        output = self.sampler.sample(logits, sampled, self.eos_token_ids)
        self.previous_rows = {seq: row for row, seq in enumerate(sampled)}
        self.previous_ids = output.token_ids
        return output

    @staticmethod
    def decodes_only(scheduled: list[tuple[Sequence, int]]) -> bool:
        """Every sequence computes one token, its last (then none is owed a prompt logprob)."""
        return all(n == 1 and seq.num_computed_tokens + 1 == seq.num_tokens for seq, n in scheduled)

    def send(self, scheduled: list[tuple[Sequence, int]], pad_to: int | None = None) -> None:
        """The step's inputs into the device buffers; with pad_to, padding rows (one token each, at position 0
        of the padding row) fill the batch up to a graph's size."""
        ids, positions, token_rows, query_start, seq_lens, rows, pending = [], [], [], [0], [], [], []
        for b, (seq, num_new) in enumerate(scheduled):
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + num_new
            ids += seq.token_ids[start:end]
            if end > len(seq.token_ids):  # its pending token: the last step sampled it
                pending.append((len(ids), self.previous_rows[seq]))
                ids.append(0)
            positions += range(start, end)
            token_rows += [b] * num_new
            query_start.append(query_start[-1] + num_new)
            seq_lens.append(end)
            rows.append(seq.block_row)
        real_tokens = len(ids)
        padding = (pad_to or 0) - len(scheduled)
        if padding > 0:
            ids += [0] * padding
            positions += [0] * padding
            token_rows += range(len(scheduled), pad_to)
            query_start += range(query_start[-1] + 1, query_start[-1] + padding + 1)
            seq_lens += [1] * padding
            rows += [self.block_table.padding_row] * padding
        self.block_table.sync()
        self.inputs.send(ids, positions, token_rows, query_start, seq_lens, rows, pending, self.previous_ids,
                         real_tokens)

    def send_padding(self, size: int) -> None:
        self.send([], pad_to=size)

    def device_batch(self, num_tokens: int, query_lens: list[int], seq_lens: list[int]):
        """Token ids [T], positions [T] and attention metadata as device views of the sent inputs."""
        batch = len(query_lens)
        ids, positions, token_rows, query_start, seq_lens_d, rows = self.inputs.fields(num_tokens, batch)
        block_table = self.block_table.table[rows.long()]  # [B, max_blocks_per_seq]
        metadata = AttentionMetadata(
            num_decodes=sum(1 for n in query_lens if n == 1), query_start_loc=query_start, seq_lens=seq_lens_d,
            block_table=block_table, slot_mapping=slots_of(block_table, token_rows, positions, self.block_size),
            block_size=self.block_size, query_lens_host=query_lens, seq_lens_host=seq_lens)
        return ids.long(), positions.long(), metadata

    def graph_forward(self, batch: int) -> torch.Tensor:
        """What a decode graph of `batch` rows holds: the forward from the device inputs to the logits [B, V].
        The host lengths are bounds (the kernels read the real ones on the device): splits for max_model_len."""
        ids, positions, metadata = self.device_batch(batch, [1] * batch, [self.max_model_len] * batch)
        hidden = self.model.model(ids, positions, self.attention.bind(metadata))
        return self.model.compute_logits(hidden)

    def prompt_logprobs(self, hidden, ids, rows) -> dict[int, list[tuple[int, dict[int, Logprob]]]]:
        if not rows:
            return {}
        logits = self.model.compute_logits(hidden[[row for _, row, _ in rows]]).float()
        targets = torch.tensor([seq.token_ids[index] for seq, _, index in rows], device=self.device)
        entries = token_logprobs(torch.log_softmax(logits, dim=-1), targets,
                                 [seq.params.prompt_logprobs for seq, _, _ in rows])
        result: dict[int, list] = {}
        for (seq, _, index), entry in zip(rows, entries):
            result.setdefault(id(seq), []).append((index, entry))
        return result
