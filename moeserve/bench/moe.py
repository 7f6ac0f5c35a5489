"""The experts of one MoE layer on one GPU: the fused kernels against baselines measured in the same
run (a per-expert torch loop; torch._grouped_mm in bf16; torch._scaled_grouped_mm in FP8 rowwise).
Per point: median time (CUDA events), TFLOP/s, and effective weight bandwidth = bytes of the experts
actually touched / time. Routing is uniform random top-k over the local experts. Times are of CUDA-graph
replays (what the GPU spends, launch overhead excluded) where the implementation can be captured; the
eager time (Python launches included, as the engine runs today) is reported beside it."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moeserve.bench.timing import graph_of, time_ms
from moeserve.config import ModelConfig
from moeserve.kernels.fused_moe import fused_experts
from moeserve.kernels.moe_gemm import GemmConfig
from moeserve.kernels.row_layout import RowLayout
from moeserve.layers.moe.experts import Experts
from moeserve.quant.formats import make_quantized_weight
from moeserve.quant.fp8 import E4M3_MAX


@dataclass
class MoePoint:
    name: str
    milliseconds: float  # CUDA-graph replay where capturable, else eager
    eager_milliseconds: float
    tflops: float
    weight_tb_per_s: float


def make_experts(config: ModelConfig, local_experts: int, fmt: str, device) -> Experts:
    """Random experts, made (and quantized) one expert at a time so that 256 experts fit beside each other."""
    hidden, intermediate = config.hidden_size, config.moe.intermediate_size
    with torch.device("meta"):
        experts = Experts(local_experts, hidden, intermediate)
    with torch.device(device):
        if fmt == "bf16":
            experts.gate_up_proj = nn.Parameter(torch.empty(local_experts, 2 * intermediate, hidden, dtype=torch.bfloat16))
            experts.down_proj = nn.Parameter(torch.empty(local_experts, hidden, intermediate, dtype=torch.bfloat16))
        else:
            del experts.gate_up_proj, experts.down_proj
            experts.gate_up_proj = make_quantized_weight(fmt, (local_experts, 2, intermediate, hidden))
            experts.down_proj = make_quantized_weight(fmt, (local_experts, hidden, intermediate))
        for e in range(local_experts):
            gate_up = torch.randn(2 * intermediate, hidden) / hidden**0.5
            down = torch.randn(hidden, intermediate) / intermediate**0.5
            if fmt == "bf16":
                experts.gate_up_proj.data[e], experts.down_proj.data[e] = gate_up, down
            else:
                experts.gate_up_proj.quantize_matrices(gate_up[:intermediate], 2 * e)
                experts.gate_up_proj.quantize_matrices(gate_up[intermediate:], 2 * e + 1)
                experts.down_proj.quantize_matrices(down, e)
    return experts.requires_grad_(False)


def random_routing(config: ModelConfig, local_experts: int, tokens: int, device) -> tuple[torch.Tensor, RowLayout]:
    """bf16 tokens, each sent to top_k distinct local experts chosen uniformly, with random weights."""
    top_k = min(config.moe.top_k, local_experts)
    x = torch.randn(tokens, config.hidden_size, device=device).bfloat16()
    slots = torch.rand(tokens, local_experts, device=device).argsort(dim=1)[:, :top_k].int()
    return x, RowLayout(slots, torch.rand(tokens, top_k, device=device))


def expert_bytes(experts: Experts) -> int:
    return sum(p.numel() * p.element_size() for p in experts.parameters()) // experts.num_experts


def expert_offsets(slots: torch.Tensor, num_experts: int) -> torch.Tensor:
    """End offset of each expert's rows once rows are sorted by expert (no host sync, unlike bincount)."""
    flat = slots.flatten().long()
    counts = torch.zeros(num_experts, dtype=torch.long, device=slots.device).scatter_add_(0, flat, torch.ones_like(flat))
    return counts.cumsum(0).to(torch.int32)


def grouped_mm_baseline(experts: Experts, x, slots):
    """bf16 torch._grouped_mm on rows sorted by expert (the sort is counted)."""
    order = slots.flatten().argsort()
    offsets = expert_offsets(slots, experts.num_experts)
    rows = x[order // slots.shape[1]]
    gate, up = torch._grouped_mm(rows, experts.gate_up_proj.transpose(-2, -1), offs=offsets).chunk(2, dim=-1)
    return torch._grouped_mm(F.silu(gate) * up, experts.down_proj.transpose(-2, -1), offs=offsets)


def rowwise_fp8(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., K] -> FP8 values [..., K] and one fp32 scale per row [...] (the baseline's own lean cast)."""
    scale = t.float().abs().amax(dim=-1).clamp(min=1e-12) / E4M3_MAX
    return (t.float() / scale[..., None]).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn), scale


def scaled_grouped_mm_baseline(gate_up, down, x, slots, num_experts):
    """FP8 rowwise torch._scaled_grouped_mm (activations quantized per row, weights per output row)."""
    order = slots.flatten().argsort()
    offsets = expert_offsets(slots, num_experts)
    a, a_scale = rowwise_fp8(x[order // slots.shape[1]])
    (w1, s1), (w2, s2) = gate_up, down
    h = torch._scaled_grouped_mm(a, w1.transpose(-2, -1), a_scale, s1, offs=offsets, out_dtype=torch.bfloat16)
    gate, up = h.chunk(2, dim=-1)
    act_fp8, act_scale = rowwise_fp8(F.silu(gate) * up)
    return torch._scaled_grouped_mm(act_fp8, w2.transpose(-2, -1), act_scale, s2, offs=offsets, out_dtype=torch.bfloat16)


def gpu_ms(fn) -> tuple[float, bool]:
    """fn's time as CUDA-graph replays where it can be captured (else eager), and whether it was."""
    replay = graph_of(fn)
    return (time_ms(replay), True) if replay else (time_ms(fn), False)


def rowwise_fp8_weights(weight, num_experts: int):
    """One weight requantized for the FP8 rowwise baseline, one expert at a time."""
    parts = [rowwise_fp8(weight.dequantize(torch.bfloat16, e).reshape(-1, weight.shape[-1])) for e in range(num_experts)]
    return torch.stack([values for values, _ in parts]), torch.stack([scale for _, scale in parts])


def rowwise_baseline_weights(experts: Experts):
    """(gate_up, down) of FP8 block experts, requantized rowwise for torch._scaled_grouped_mm."""
    return (rowwise_fp8_weights(experts.gate_up_proj, experts.num_experts),
            rowwise_fp8_weights(experts.down_proj, experts.num_experts))


def kernel_breakdown(fn) -> str:
    """The GPU kernels of one call of fn and their times (torch profiler), longest first."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profiler:
        fn()
        torch.cuda.synchronize()
    kernels = sorted(((e.key, e.device_time_total) for e in profiler.key_averages() if e.device_time_total > 0),
                     key=lambda kernel: -kernel[1])
    return "; ".join(f"{name[:48]} {us:.0f} us" for name, us in kernels[:10])


def measure(config: ModelConfig, experts: Experts, tokens: int, fmt: str, profile: bool = False,
            rowwise_weights=None) -> list[MoePoint]:
    """The points of one shape; rowwise_weights (FP8 only): `rowwise_baseline_weights(experts)`."""
    local_experts = experts.num_experts
    x, layout = random_routing(config, local_experts, tokens, next(experts.parameters()).device)
    slots, top_k = layout.slots, layout.slots.shape[1]
    touched = int(torch.unique(slots).numel())
    flops = 6 * tokens * top_k * config.hidden_size * config.moe.intermediate_size
    weight_bytes = touched * expert_bytes(experts)

    def point(name, fn, capturable=True):
        eager = time_ms(fn)
        ms, captured = gpu_ms(fn) if capturable else (eager, False)
        return MoePoint(name + ("" if captured else " (eager)"), ms, eager, flops / ms / 1e9, weight_bytes / ms / 1e9)

    points = [point(f"moeserve {fmt}", lambda: fused_experts(experts, x, layout))]
    if profile:
        print(f"  kernels, {local_experts} experts, {tokens} tokens, {fmt}:",
              kernel_breakdown(lambda: fused_experts(experts, x, layout)), flush=True)
    if tokens <= 2048:
        points.append(point(f"torch loop {fmt}", lambda: experts.reference(x, layout), capturable=False))
    if fmt == "bf16":
        try:
            points.append(point("torch._grouped_mm bf16", lambda: grouped_mm_baseline(experts, x, slots)))
        except (RuntimeError, TypeError) as error:
            print(f"  torch._grouped_mm unavailable: {error}")
    if fmt == "fp8":
        gate_up, down = rowwise_weights
        try:
            points.append(point("torch._scaled_grouped_mm fp8 rowwise",
                                lambda: scaled_grouped_mm_baseline(gate_up, down, x, slots, local_experts)))
        except (RuntimeError, TypeError) as error:
            print(f"  torch._scaled_grouped_mm unavailable: {error}")
    return points


def tune(config: ModelConfig, experts: Experts, tokens: int, device) -> tuple[GemmConfig, float]:
    """The fastest candidate block configuration for this shape (and its time in ms, CUDA-graph replays)."""
    from moeserve.kernels.tuning import candidates

    x, layout = random_routing(config, experts.num_experts, tokens, device)
    rows = layout.slots.numel()
    expected = fused_experts(experts, x, layout).float()  # a sanity check: the card's table or the defaults
    best = None
    for candidate in candidates(rows):
        try:
            ms, captured = gpu_ms(lambda: fused_experts(experts, x, layout, candidate))
            actual = fused_experts(experts, x, layout, candidate).float()
        except Exception:  # a candidate that does not compile on this card (shared memory) is skipped
            continue
        if not captured:  # eager times include launches: not comparable with the graph-timed others
            print(f"  {candidate} skipped: it could not be captured in a CUDA graph")
            continue
        if not ((actual - expected).norm() <= 1e-2 * expected.norm()):  # wrong (or NaN): never kept
            print(f"  {candidate} rejected: its output differs from the default blocks'")
            continue
        if best is None or ms < best[1]:
            best = (candidate, ms)
    if best is None:
        raise RuntimeError(f"no block configuration compiled and matched the default's output for {tokens} tokens")
    return best
