"""The experts of one MoE layer on one GPU: the fused kernels against baselines measured in the same
run (a per-expert torch loop; torch._grouped_mm in bf16; torch._scaled_grouped_mm in FP8 rowwise).
Per point: median time (CUDA events), TFLOP/s, and effective weight bandwidth = bytes of the experts
actually touched / time. Routing is uniform random top-k over the local experts."""

import statistics
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moeserve.config import ModelConfig
from moeserve.kernels.fused_moe import fused_experts
from moeserve.kernels.moe_gemm import GemmConfig
from moeserve.layers.moe.experts import Experts, RowLayout
from moeserve.quant.formats import make_quantized_weight
from moeserve.quant.fp8 import E4M3_MAX


@dataclass
class MoePoint:
    name: str
    milliseconds: float
    tflops: float
    weight_tb_per_s: float


def make_experts(config: ModelConfig, local_experts: int, fmt: str, device) -> Experts:
    hidden, intermediate = config.hidden_size, config.moe.intermediate_size
    with torch.device(device):
        experts = Experts(local_experts, hidden, intermediate)
        gate_up = torch.randn(local_experts, 2 * intermediate, hidden) / hidden**0.5
        down = torch.randn(local_experts, hidden, intermediate) / intermediate**0.5
        if fmt == "bf16":
            experts.gate_up_proj.data, experts.down_proj.data = gate_up.bfloat16(), down.bfloat16()
        else:
            del experts.gate_up_proj, experts.down_proj
            experts.gate_up_proj = make_quantized_weight(fmt, (local_experts, 2, intermediate, hidden))
            experts.down_proj = make_quantized_weight(fmt, (local_experts, hidden, intermediate))
            experts.gate_up_proj.quantize_from(gate_up)
            experts.down_proj.quantize_from(down)
    return experts.requires_grad_(False)


def random_routing(config: ModelConfig, local_experts: int, tokens: int, device) -> tuple[torch.Tensor, RowLayout]:
    """bf16 tokens, each sent to top_k distinct local experts chosen uniformly, with random weights."""
    top_k = min(config.moe.top_k, local_experts)
    x = torch.randn(tokens, config.hidden_size, device=device).bfloat16()
    slots = torch.rand(tokens, local_experts, device=device).argsort(dim=1)[:, :top_k].int()
    return x, RowLayout(slots, torch.rand(tokens, top_k, device=device))


def expert_bytes(experts: Experts) -> int:
    return sum(p.numel() * p.element_size() for p in experts.parameters()) // experts.num_experts


def time_ms(fn, iterations: int = 20, warmup: int = 5) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iterations):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def grouped_mm_baseline(experts: Experts, x, slots):
    """bf16 torch._grouped_mm on rows sorted by expert (the sort is counted)."""
    flat = slots.flatten().long()
    order = flat.argsort()
    offsets = torch.bincount(flat, minlength=experts.num_experts).cumsum(0).to(torch.int32)
    rows = x[order // slots.shape[1]]
    gate, up = torch._grouped_mm(rows, experts.gate_up_proj.transpose(-2, -1), offs=offsets).chunk(2, dim=-1)
    return torch._grouped_mm(F.silu(gate) * up, experts.down_proj.transpose(-2, -1), offs=offsets)


def rowwise_fp8(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., K] -> FP8 values [..., K] and one fp32 scale per row [...] (the baseline's own lean cast)."""
    scale = t.float().abs().amax(dim=-1).clamp(min=1e-12) / E4M3_MAX
    return (t.float() / scale[..., None]).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn), scale


def scaled_grouped_mm_baseline(gate_up, down, x, slots, num_experts):
    """FP8 rowwise torch._scaled_grouped_mm (activations quantized per row, weights per output row)."""
    flat = slots.flatten().long()
    order = flat.argsort()
    offsets = torch.bincount(flat, minlength=num_experts).cumsum(0).to(torch.int32)
    a, a_scale = rowwise_fp8(x[order // slots.shape[1]])
    (w1, s1), (w2, s2) = gate_up, down
    h = torch._scaled_grouped_mm(a, w1.transpose(-2, -1), a_scale, s1, offs=offsets, out_dtype=torch.bfloat16)
    gate, up = h.chunk(2, dim=-1)
    act_fp8, act_scale = rowwise_fp8(F.silu(gate) * up)
    return torch._scaled_grouped_mm(act_fp8, w2.transpose(-2, -1), act_scale, s2, offs=offsets, out_dtype=torch.bfloat16)


def measure(config: ModelConfig, local_experts: int, tokens: int, fmt: str, device) -> list[MoePoint]:
    experts = make_experts(config, local_experts, fmt, device)
    x, layout = random_routing(config, local_experts, tokens, device)
    slots, top_k = layout.slots, layout.slots.shape[1]
    touched = int(torch.unique(slots).numel())
    flops = 6 * tokens * top_k * config.hidden_size * config.moe.intermediate_size
    weight_bytes = touched * expert_bytes(experts)

    def point(name, fn):
        ms = time_ms(fn)
        return MoePoint(name, ms, flops / ms / 1e9, weight_bytes / ms / 1e9)

    points = [point(f"moeserve {fmt}", lambda: fused_experts(experts, x, layout))]
    if tokens <= 2048:
        points.append(point(f"torch loop {fmt}", lambda: experts.reference(x, layout)))
    if fmt == "bf16":
        try:
            points.append(point("torch._grouped_mm bf16", lambda: grouped_mm_baseline(experts, x, slots)))
        except (RuntimeError, TypeError) as error:
            print(f"  torch._grouped_mm unavailable: {error}")
    if fmt == "fp8":
        gate_up = rowwise_fp8(experts.gate_up_proj.dequantize(torch.bfloat16).reshape(local_experts, -1, config.hidden_size))
        down = rowwise_fp8(experts.down_proj.dequantize(torch.bfloat16))
        try:
            points.append(point("torch._scaled_grouped_mm fp8 rowwise",
                                lambda: scaled_grouped_mm_baseline(gate_up, down, x, slots, local_experts)))
        except (RuntimeError, TypeError) as error:
            print(f"  torch._scaled_grouped_mm unavailable: {error}")
    return points


def tune(config: ModelConfig, local_experts: int, tokens: int, fmt: str, device) -> tuple[GemmConfig, float]:
    """The fastest candidate block configuration for this shape (and its time in ms)."""
    from moeserve.kernels.tuning import candidates, default_config

    experts = make_experts(config, local_experts, fmt, device)
    x, layout = random_routing(config, local_experts, tokens, device)
    rows = layout.slots.numel()
    expected = fused_experts(experts, x, layout, default_config(rows)).float()  # a sanity check
    best = None
    for candidate in candidates(rows):
        try:
            ms = time_ms(lambda: fused_experts(experts, x, layout, candidate))
            actual = fused_experts(experts, x, layout, candidate).float()
        except Exception:  # a candidate that does not compile on this card (shared memory) is skipped
            continue
        if not ((actual - expected).norm() <= 1e-2 * expected.norm()):  # wrong (or NaN): never kept
            print(f"  {candidate} rejected: its output differs from the default blocks'")
            continue
        if best is None or ms < best[1]:
            best = (candidate, ms)
    return best
