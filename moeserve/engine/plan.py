"""Memory per rank before launch: weights (exact, from the rank's shard built on the meta device), the
activation peak, the CUDA-graph pool and the EP communication buffers (estimates of what the engine
reserves), and what is left for the KV cache, as tokens and as concurrency at max_model_len.

The engine sizes its KV cache with `kv_cache_budget` and `kv_blocks` below; on CUDA it measures the
activation peak by running the largest step and takes the other terms from here, so that `moeserve plan`
and a started engine do the same arithmetic.
"""

from dataclasses import dataclass, replace

import torch

from moeserve.config import ConfigError, ModelConfig
from moeserve.distributed.ep.peer_to_peer import PeerBuffers, row_bytes
from moeserve.distributed.ep.token_formats import token_format
from moeserve.distributed.layout import ParallelLayout
from moeserve.distributed.parallelize import ParallelOptions, resolve_ep_backend
from moeserve.engine.kv_cache import bytes_per_block
from moeserve.loader.build import build_model
from moeserve.quant.apply import QuantPlan, apply_plan, default_plan, weight_bytes_by_format

GIB = 2**30
# What torch.cuda.mem_get_info reports as total (H200: measured on the lent card; H100 80 GB and B200
# from public device queries).
GPU_MEMORY = {"H100": int(79.1 * GIB), "H200": int(139.8 * GIB), "B200": int(178.35 * GIB)}
# What a started engine holds beside its weights when it sizes the cache: the CUDA context and libraries
# (0.67-0.88 GiB outside torch's allocator on an H100) and the allocator's free blocks left by loading
# (0.45-1.45 GiB), for V2-Lite and Qwen3-30B-A3B in bf16 and FP8 (scripts/plan_vs_engine.py; docs/perf.md 2026-12-07).
CUDA_CONTEXT_BYTES = int(1.75 * GIB)
GPUS_PER_NODE = 8  # the nodes plans are made for (H100 / H200 / B200 boxes)
# The engine's profiling pass runs the token budget as sequences of at most this many tokens through eager
# attention, whose fp32 scores grow with the square of a sequence (the engine's prefill runs flash kernels, whose
# memory is linear): short sequences keep the reservation near what serving uses (DeepSeek-V3, 128 heads, 8,192
# tokens: 2.1 GiB of scores at 256, 17 GiB at 2,048).
PROFILE_SEQ_LEN = 256


class PlanningGroups:
    """A rank of a layout without processes: what parallelize reads of ParallelGroups (no group handles,
    which only a forward would use)."""

    tp_group = dp_group = ep_group = None

    def __init__(self, layout: ParallelLayout, rank: int):
        self.layout, self.rank = layout, rank
        self.tp_rank, self.dp_rank, self.ep_rank = layout.tp_index(rank), layout.dp_index(rank), layout.ep_index(rank)


@dataclass(frozen=True)
class Request:
    """What an engine would be started with: the model's config and the options that decide memory."""

    config: ModelConfig
    layout: ParallelLayout = ParallelLayout()
    quantization: str | None = None  # quantize-on-load format; a quantized checkpoint gives checkpoint_plan
    checkpoint_plan: QuantPlan | None = None
    dtype: torch.dtype = torch.bfloat16
    kv_cache_dtype: str = "auto"
    max_model_len: int | None = None  # None: the model's
    max_num_seqs: int = 128
    max_num_batched_tokens: int = 8192
    block_size: int | None = None  # None: the engine's choice on CUDA, 64 for MLA and 16 otherwise
    gpu_memory: int = GPU_MEMORY["H200"]
    gpu_memory_utilization: float = 0.9
    kv_cache_memory: int | None = None  # bytes: the KV cache's size as given, as the engine takes it
    num_redundant_experts: int = 0
    ep_dispatch_format: str = "bf16"
    enforce_eager: bool = False
    ep_backend: str = "auto"  # on a GPU within one node: p2p
    ep_max_tokens_per_rank: int | None = None  # p2p buffers; None: max_num_batched_tokens
    ep_two_batch_overlap: bool = False  # p2p: a high-throughput buffer set per micro-batch

    @property
    def p2p(self) -> bool:
        """Whether EP goes over the p2p transport, as the backend resolves on GPUs of 8-GPU nodes."""
        return resolve_ep_backend(self.ep_backend, "meta", self.layout.ep, GPUS_PER_NODE) == "p2p"

    @property
    def cuda_graphs(self) -> bool:
        """Whether a CUDA engine captures decode graphs: unless told not to, or expert-parallel over NCCL (its
        dispatch sizes on the host; the p2p backend's low-latency mode does not)."""
        return not self.enforce_eager and (self.layout.ep == 1 or self.p2p)

    @property
    def kv_block_size(self) -> int:
        return self.block_size or (64 if self.config.mla is not None else 16)

    @property
    def model_len(self) -> int:
        return self.max_model_len or self.config.max_position_embeddings


@dataclass(frozen=True)
class RankMemory:
    ranks: tuple[int, ...]  # the ranks with this shard (they plan the same)
    weights: dict[str, int]  # bytes per format (a float dtype or a quantized format), scales included
    activations: int
    graph_pool: int
    ep_buffers: int
    kv_budget: int
    kv_tokens: int

    @property
    def weight_bytes(self) -> int:
        return sum(self.weights.values())

    def concurrency(self, max_model_len: int) -> int:
        return self.kv_tokens // max_model_len


def rank_weight_bytes(request: Request, rank: int) -> dict[str, int]:
    """The parameters of `rank`'s shard (its experts and redundant slots, its TP slices), per format, as the
    loader builds it (quantize-on-load quantizes the built shard)."""
    parallel = None
    if request.layout.world_size > 1:
        parallel = ParallelOptions(PlanningGroups(request.layout, rank), request.ep_dispatch_format,
                                   num_redundant_experts=request.num_redundant_experts)
    model = build_model(request.config, request.dtype, "meta", request.checkpoint_plan, parallel)
    if request.quantization is not None:
        apply_plan(model, default_plan(model, request.quantization))
    return weight_bytes_by_format(model)


def profile_batch_shape(num_tokens: int, max_model_len: int) -> tuple[int, int]:
    """(sequences, tokens each) covering at least num_tokens, none longer than PROFILE_SEQ_LEN or max_model_len."""
    longest = max(1, min(PROFILE_SEQ_LEN, max_model_len))
    batch = -(-num_tokens // longest)
    return batch, -(-num_tokens // batch)


def ep_tokens_per_rank(max_num_batched_tokens: int, max_model_len: int, tp: int, given: int | None = None) -> int:
    """Tokens one rank may dispatch in one step, which sizes the p2p buffers: its share of the largest step (a tp
    group splits a step's tokens), the memory profile's included (its batch shape may round up), or `given` if more."""
    batch, seq_len = profile_batch_shape(max_num_batched_tokens, max_model_len)
    return max(given or 0, -(-max(max_num_batched_tokens, batch * seq_len) // tp))


def largest_step_activation_bytes(config: ModelConfig, layout: ParallelLayout, dtype: torch.dtype, tokens: int,
                                  logit_rows: int, max_model_len: int, dense_attention: bool,
                                  expert_tokens: int | None = None) -> int:
    """An estimate of the peak above the weights while one step of `tokens` tokens runs: the residual stream,
    the largest of a layer's attention, MoE and dense-MLP intermediates, or the last rows' logits in fp32 with
    their softmax. dense_attention: the profiling pass's eager attention, whose fp32 scores grow with the square
    of its sequences (PROFILE_SEQ_LEN at most); else the paged kernels, whose scratch is small. expert_tokens: the
    rows the experts run over, if not the step's tokens."""
    act = dtype.itemsize
    heads = config.num_heads // layout.tp
    stream = 3 * tokens * config.hidden_size * act  # hidden, residual, normed
    if config.mla is not None:
        mla = config.mla
        attention = tokens * heads * (2 * mla.qk_head_dim + mla.qk_nope_head_dim + 2 * mla.v_head_dim) * act
        attention += tokens * mla.latent_dim * act
    else:
        kv_heads = max(config.num_kv_heads // layout.tp, 1)
        attention = tokens * (2 * heads + 2 * kv_heads) * config.head_dim * act
    if dense_attention:
        batch, seq_len = profile_batch_shape(tokens, max_model_len)
        attention += 2 * batch * heads * seq_len * seq_len * 4
    intermediates = [attention]
    if config.moe_layers:
        moe = config.moe
        rows = (tokens if expert_tokens is None else expert_tokens) * moe.top_k
        inner = moe.intermediate_size // (layout.tp if layout.ep == 1 else 1)
        experts = rows * (3 * inner + 2 * config.hidden_size) * act
        shared = tokens * 3 * moe.shared_intermediate_size // layout.tp * act
        dispatch = 2 * rows * config.hidden_size * act if layout.ep > 1 else 0
        intermediates.append(experts + shared + dispatch)
    if len(config.moe_layers) < config.num_layers:
        intermediates.append(tokens * 3 * config.intermediate_size // layout.tp * act)
    logits = logit_rows * config.vocab_size * (act + 8)
    return max(stream + max(intermediates), logits)


# What start-up takes after sizing beyond the largest graph's activations: the other graphs' pieces of the pool,
# library workspaces and the runner's static buffers; measured 0.16-0.27 GiB (scripts/plan_vs_engine.py on an H100:
# V2-Lite and Qwen3-30B-A3B, bf16 and FP8, graphs up to 128 sequences).
GRAPH_POOL_EXTRA_BYTES = GIB // 4


def graph_pool_bytes(config: ModelConfig, layout: ParallelLayout, dtype: torch.dtype, max_graph_batch: int,
                     max_model_len: int) -> int:
    """The decode graphs share one memory pool, as large as the largest captured batch's step needs. Under EP the
    graphs exchange in the p2p backend's low-latency mode, whose experts run over every rank's region of the largest
    batch."""
    expert_tokens = layout.ep * max_graph_batch if layout.ep > 1 else None
    return GRAPH_POOL_EXTRA_BYTES + largest_step_activation_bytes(config, layout, dtype, max_graph_batch,
                                                                  max_graph_batch, max_model_len, dense_attention=False,
                                                                  expert_tokens=expert_tokens)


def ep_buffer_bytes(request: "Request") -> int:
    """Persistent EP communication buffers: the p2p backend's PeerBuffers (a count matrix, receive rows for every rank
    sending all its tokens here, this rank's experts' results for each of those rows), for its largest step and, with
    decode graphs, for its largest graphed decode batch (the low-latency set); none for the NCCL all-to-all and
    all-gather backends, whose transfers are allocated per step (inside the activation peak)."""
    ep = request.layout.ep
    if not request.p2p:
        return 0
    hidden = request.config.hidden_size
    row = row_bytes(token_format(request.ep_dispatch_format, request.dtype), hidden, request.config.moe.top_k)
    tokens = ep_tokens_per_rank(request.max_num_batched_tokens, request.model_len, request.layout.tp,
                                request.ep_max_tokens_per_rank)
    micro_batches = 2 if request.ep_two_batch_overlap else 1  # either micro-batch may hold a whole step
    sets = [tokens] * micro_batches + ([min(request.max_num_seqs, request.max_num_batched_tokens)]
                                       if request.cuda_graphs else [])
    return sum(PeerBuffers(ep, n, row, hidden, request.dtype, "meta").nbytes for n in sets)  # as the transport makes them


def ep_buffers_note(request: "Request") -> str:
    if request.layout.ep == 1:
        return "(no EP)"
    if request.p2p:
        return "(p2p transport: receive and results areas, allocated at start; --ep-max-tokens-per-rank)"
    return "(NCCL all-to-all: allocated per step, inside the activation peak)"


def kv_cache_budget(gpu_memory: int, utilization: float, in_use: int, activations: int, graph_pool: int) -> int:
    """The engine's rule: utilization x the card, less what is in use (weights, context), the largest step's
    activations and the decode graphs' pool."""
    return int(utilization * gpu_memory) - in_use - activations - graph_pool


def kv_blocks(budget: int, block_bytes: int) -> int:
    return max(budget // block_bytes, 0)


def plan_rank(request: Request, rank: int = 0) -> RankMemory:
    config, layout = request.config, request.layout
    weights = rank_weight_bytes(request, rank)
    tokens = request.max_num_batched_tokens
    rows = min(request.max_num_seqs, tokens)
    activations = largest_step_activation_bytes(config, layout, request.dtype, tokens, rows, request.model_len,
                                                dense_attention=True)
    graph_pool = graph_pool_bytes(config, layout, request.dtype, rows, request.model_len) if request.cuda_graphs else 0
    ep_buffers = ep_buffer_bytes(request)
    in_use = sum(weights.values()) + CUDA_CONTEXT_BYTES + ep_buffers
    budget = request.kv_cache_memory or kv_cache_budget(request.gpu_memory, request.gpu_memory_utilization, in_use,
                                                        activations, graph_pool)
    tokens_cached = kv_blocks(budget, bytes_per_token(request) * request.kv_block_size) * request.kv_block_size
    return RankMemory(tuple(range(layout.world_size)), weights, activations, graph_pool, ep_buffers, budget,
                      tokens_cached)


def fits(memory: RankMemory, request: Request, concurrency: int) -> bool:
    return memory.kv_budget > 0 and memory.concurrency(request.model_len) >= concurrency


def candidate_layouts(config: ModelConfig, max_gpus: int = 256) -> list[ParallelLayout]:
    """Layouts by GPU count: data-parallel attention with the experts over every rank first, then tensor
    parallelism inside a node of 8 with the experts over every rank; those the model cannot split are skipped."""
    layouts = []
    gpus = 1
    while gpus <= max_gpus:
        for tp in sorted({1, min(gpus, GPUS_PER_NODE)}):
            layout = ParallelLayout(tp=tp, dp=gpus // tp, ep=gpus if config.moe_layers else 1)
            try:
                layout.check_model(config)
            except ConfigError:
                continue
            layouts.append(layout)
        gpus *= 2
    return layouts


def smallest_fitting_layout(request: Request, concurrency: int) -> tuple[ParallelLayout, RankMemory] | None:
    for layout in candidate_layouts(request.config):
        if request.num_redundant_experts and (layout.ep == 1 or request.num_redundant_experts % layout.ep):
            continue
        memory = plan_rank(replace(request, layout=layout))
        if fits(memory, request, concurrency):
            return layout, memory
    return None


def gib(n: int) -> str:
    return f"{n / GIB:,.2f} GiB"


def report(request: Request, memory: RankMemory, concurrency: int, gpu_name: str) -> list[str]:
    """The per-rank table of `moeserve plan`."""
    layout, config = request.layout, request.config
    weights = ", ".join(f"{fmt} {gib(size)}" for fmt, size in sorted(memory.weights.items(), key=lambda kv: -kv[1]))
    ranks = f"ranks 0-{layout.world_size - 1} hold equal shards" if layout.world_size > 1 else "one rank"
    lines = [
        f"layout tp={layout.tp} dp={layout.dp} ep={layout.ep} on {layout.world_size} x {gpu_name} "
        f"({gib(request.gpu_memory)} each, gpu_memory_utilization {request.gpu_memory_utilization:.2f})",
        f"per rank ({ranks}):",
        f"  weights           {gib(memory.weight_bytes):>12}   ({weights}; exact, scales included)",
        f"  activation peak   {gib(memory.activations):>12}   (the {request.max_num_batched_tokens:,}-token step; estimate)",
        f"  CUDA-graph pool   {gib(memory.graph_pool):>12}   "
        + (f"(decode graphs up to {min(request.max_num_seqs, request.max_num_batched_tokens)} sequences; estimate)"
           if request.cuda_graphs else "(no CUDA graphs: --enforce-eager)" if request.enforce_eager
           else "(no CUDA graphs: expert parallelism over NCCL dispatches eagerly)"),
        f"  EP buffers        {gib(memory.ep_buffers):>12}   " + ep_buffers_note(request),
        f"  CUDA context      {gib(CUDA_CONTEXT_BYTES):>12}   (and the allocator's free blocks after loading; measured)",
        f"  KV cache          {gib(memory.kv_budget):>12}   -> {memory.kv_tokens:,} tokens "
        f"(blocks of {request.kv_block_size}), {memory.concurrency(request.model_len):,} sequences at max_model_len "
        f"{request.model_len:,}",
    ]
    if request.num_redundant_experts:
        lines.insert(3, f"  (weights include {request.num_redundant_experts // layout.ep} redundant expert slots per "
                        f"MoE layer on each rank, {request.num_redundant_experts} in all)")
    if memory.kv_budget <= 0:
        lines.append(f"  the rank is short by {gib(-memory.kv_budget)} before any KV cache")
    verdict = "fits" if fits(memory, request, concurrency) else "does NOT fit"
    lines.append(f"{verdict}: asked for {concurrency:,} sequence(s) of {request.model_len:,} tokens at once per rank"
                 f" ({config.num_layers} layers, {bytes_per_token(request):,} KV bytes per token)")
    return lines


def bytes_per_token(request: Request) -> int:
    kv_dtype = torch.float8_e4m3fn if request.kv_cache_dtype == "fp8" else request.dtype
    block = request.kv_block_size
    return bytes_per_block(request.config, block, kv_dtype, request.layout.tp) // block
