"""EngineArgs: how the engine runs a model, and the names each option accepts.

The CLI builds its flags from these names; every field is checked here. Names that a lower layer
implements (weight formats, token formats on the wire) come from that layer.
"""

import re
from dataclasses import dataclass

import torch

from moeserve.config import ConfigError
from moeserve.distributed.ep.token_formats import DISPATCH_FORMATS
from moeserve.quant.formats import FORMATS

DTYPE_NAMES = ("auto", "float32", "bfloat16", "float16")
LOAD_FORMATS = ("auto", "dummy")
QUANTIZATION_FORMATS = tuple(FORMATS)  # weight formats: fp8, nvfp4
EP_BACKENDS = ("auto", "all_to_all", "allgather", "p2p")  # auto: p2p on CUDA within a node, else all_to_all
KV_CACHE_DTYPES = ("auto", "fp8")  # auto: the model's dtype; fp8: E4M3 with a per-layer scale
# Tokens per step, as vLLM sets them on large GPUs: a served engine keeps chunks small enough for the decodes
# sharing their step; offline, larger chunks keep the GPU busy through the host's per-step work.
OFFLINE_MAX_NUM_BATCHED_TOKENS = 16384
ATTENTION_BACKENDS = ("auto", "torch", "triton")  # moeserve.layers.attention.backend; auto: triton on CUDA


@dataclass
class EngineArgs:
    """How the engine runs a model; every field is checked, and an error names it and its range."""

    model: str
    dtype: str = "auto"  # auto: the checkpoint's dtype
    device: str = "auto"  # auto: cuda if available, else cpu
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    max_num_seqs: int = 128
    max_num_batched_tokens: int = 8192  # a server's; offline (LLM, generate, bench) OFFLINE_MAX_NUM_BATCHED_TOKENS
    block_size: int | None = None  # None: 64 for MLA on CUDA (decode tiles then sit in one block), else 16
    kv_cache_dtype: str = "auto"
    attention_backend: str = "auto"
    kv_cache_memory: int | None = None  # bytes; default on CPU 512 MiB, on CUDA sized by gpu_memory_utilization
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True
    seed: int = 0  # for requests that set no seed
    load_format: str = "auto"  # auto: the checkpoint's weights; dummy: random weights (benchmarks, shape presets)
    quantization: str | None = None  # fp8 or nvfp4: quantize a high-precision checkpoint as it loads
    tp: int = 1  # tensor parallel size (attention heads, dense MLPs; experts too when ep = 1)
    dp: int = 1  # data parallel attention: groups of tp ranks with their own requests
    ep: int = 1  # expert parallel size: experts are spread over ep ranks
    ep_backend: str = "auto"  # p2p (peer-to-peer puts through symmetric memory) on CUDA within a node, else all_to_all
    ep_max_tokens_per_rank: int | None = None  # p2p buffers' tokens a rank; None: max_num_batched_tokens
    ep_dispatch_format: str = "bf16"  # tokens on the wire: bf16 (unquantized), fp8, nvfp4
    ep_two_batch_overlap: bool = False  # eager steps as two micro-batches, one's exchanges beside the other's compute
    ep_comm_sms: int | None = None  # p2p: puts on a stream of their own with at most this many SMs; None: inline
    num_redundant_experts: int = 0  # extra expert replicas per MoE layer, spread over the EP ranks (EPLB)
    eplb_interval: int = 0  # forwards between rebalancings from the counted expert load; 0: the placement stays
    dist_timeout: float = 300.0  # seconds a collective may wait before the ranks give up
    enforce_eager: bool = False  # True: no CUDA graphs, every step runs eagerly
    cuda_graph_sizes: tuple[int, ...] | None = None  # decode batch sizes to capture; None: 1, 2, 4, 8, 16, 24, ...
    async_scheduling: bool | None = None  # the host prepares step N+1 while the device runs N; None: on CUDA only
    warm_up: bool | None = None  # prefill and decode dummy requests at start (Triton compiles then); None: on CUDA

    @property
    def micro_batches(self) -> int:
        """Micro-batches of an eager step (two-batch overlap: 2); graphed decode steps run as one."""
        return 2 if self.ep_two_batch_overlap else 1

    def __post_init__(self):
        if isinstance(self.dtype, torch.dtype):  # LLM(dtype=torch.bfloat16), as vLLM takes it
            self.dtype = str(self.dtype).removeprefix("torch.")

        def require(ok: bool, field_name: str, rule: str):
            if not ok:
                raise ConfigError(f"EngineArgs.{field_name} {rule}, got {getattr(self, field_name)!r}")

        def one_of(field_name: str, names: tuple, optional: bool = False):
            allowed = names + ((None,) if optional else ())
            require(getattr(self, field_name) in allowed, field_name,
                    f"must be one of {', '.join(map(str, allowed))}")

        one_of("dtype", DTYPE_NAMES)
        one_of("load_format", LOAD_FORMATS)
        one_of("quantization", QUANTIZATION_FORMATS, optional=True)
        one_of("ep_backend", EP_BACKENDS)
        one_of("ep_dispatch_format", DISPATCH_FORMATS)
        one_of("kv_cache_dtype", KV_CACHE_DTYPES)
        one_of("attention_backend", ATTENTION_BACKENDS)
        require(re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device) is not None, "device", "must be auto, cpu, cuda or cuda:N")
        for size in ("tp", "dp", "ep"):
            require(isinstance(getattr(self, size), int) and getattr(self, size) >= 1, size, "must be an integer >= 1")
        require(self.dist_timeout > 0, "dist_timeout", "must be positive")
        require(self.max_model_len is None or self.max_model_len >= 2, "max_model_len", "must be at least 2")
        require(self.max_num_seqs >= 1, "max_num_seqs", "must be at least 1")
        require(self.num_redundant_experts >= 0 and self.num_redundant_experts % self.ep == 0, "num_redundant_experts",
                f"must be a multiple of ep={self.ep} (each EP rank holds the same number of expert slots)")
        require(self.num_redundant_experts == 0 or self.ep > 1, "num_redundant_experts",
                "needs expert parallelism (ep > 1): with one EP rank every expert is local")
        require(self.eplb_interval >= 0, "eplb_interval", "must be 0 (off) or a number of forwards")
        require(self.eplb_interval == 0 or self.ep > 1, "eplb_interval", "needs expert parallelism (ep > 1)")
        require(self.max_num_batched_tokens >= 1, "max_num_batched_tokens", "must be at least 1")
        require(self.ep_max_tokens_per_rank is None or self.ep_max_tokens_per_rank >= -(-self.max_num_batched_tokens
                                                                                       // self.tp),
                "ep_max_tokens_per_rank", f"must hold a rank's share of a step, at least max_num_batched_tokens / tp = "
                f"{-(-self.max_num_batched_tokens // self.tp)}")
        require(not self.ep_two_batch_overlap or self.ep > 1, "ep_two_batch_overlap",
                "overlaps expert-parallel exchanges with compute and needs ep > 1")
        require(self.ep_comm_sms is None or isinstance(self.ep_comm_sms, int) and self.ep_comm_sms >= 1,
                "ep_comm_sms", "must be a number of SMs, at least 1")
        require(self.ep_comm_sms is None or self.ep > 1 and self.ep_backend in ("auto", "p2p") and self.device != "cpu",
                "ep_comm_sms", "sizes the p2p EP backend's put stream and needs ep > 1 with that backend on CUDA")
        require(self.ep_backend != "p2p" or self.device != "cpu", "ep_backend",
                "p2p puts tokens through GPU peer memory and needs a CUDA device (use all_to_all on the CPU)")
        require(self.block_size is None or self.block_size >= 1 and self.block_size & (self.block_size - 1) == 0,
                "block_size", "must be a power of two")
        require(self.kv_cache_memory is None or self.kv_cache_memory > 0, "kv_cache_memory", "must be positive")
        require(0 < self.gpu_memory_utilization <= 1, "gpu_memory_utilization", "must be in (0, 1]")
        if self.cuda_graph_sizes is not None:
            self.cuda_graph_sizes = tuple(self.cuda_graph_sizes)
            largest = min(self.max_num_seqs, self.max_num_batched_tokens)
            require(len(self.cuda_graph_sizes) > 0 and all(isinstance(s, int) and 1 <= s <= largest
                                                            for s in self.cuda_graph_sizes),
                    "cuda_graph_sizes", f"must be batch sizes in 1..{largest} (max_num_seqs, max_num_batched_tokens)")
