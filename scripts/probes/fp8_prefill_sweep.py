"""Issue 14 item 2: the FP8 grouped GEMM at DeepSeek-V3 shapes (32 local experts), each block config with the
weight scale read once per tile and K step (TILE_IN_ONE_SCALE_BLOCK) and as a vector (before), beside bf16, torch's
grouped GEMMs and dense torch._scaled_mm in the same run. Whole fused layer (layout, quantization, both GEMMs,
SiLU, sum), CUDA-graph replays.

    PYTHONPATH=. python3 scripts/probes/fp8_prefill_sweep.py
"""

import sys

import torch

import moeserve.kernels.moe_gemm as moe_gemm
from moeserve.bench.moe import (gpu_ms, grouped_mm_baseline, make_experts, random_routing, rowwise_baseline_weights,
                                scaled_grouped_mm_baseline)
from moeserve.kernels.fused_moe import fused_experts
from moeserve.kernels.moe_gemm import GemmConfig
from moeserve.kernels.tuning import default_config
from moeserve.loader.model_loader import load_config

PREFILL = [
    GemmConfig(64, 128, 64, num_warps=4, num_stages=3, persistent=True),  # the H200 table's FP8 choice
    GemmConfig(64, 128, 64, num_warps=4, num_stages=3),  # the default without a table
    GemmConfig(64, 128, 128, num_warps=4, num_stages=3),
    GemmConfig(64, 128, 128, num_warps=4, num_stages=4),
    GemmConfig(128, 128, 128, num_warps=8, num_stages=3),
    GemmConfig(128, 128, 128, num_warps=8, num_stages=4),
    GemmConfig(128, 128, 128, num_warps=8, num_stages=3, group_m=8),
    GemmConfig(128, 128, 128, num_warps=8, num_stages=3, persistent=True),
    GemmConfig(128, 128, 64, num_warps=8, num_stages=4),
]
BF16 = [GemmConfig(128, 128, 64, num_warps=8, num_stages=3, group_m=8), GemmConfig(128, 256, 64, num_warps=8, num_stages=3),
        GemmConfig(128, 128, 64, num_warps=8, num_stages=4, persistent=True)]


def with_one_scale(enabled: bool):
    original = moe_gemm.tile_in_one_scale_block.__wrapped__ if hasattr(moe_gemm.tile_in_one_scale_block, "__wrapped__") \
        else moe_gemm.tile_in_one_scale_block

    def choose(*args, **kwargs):
        return enabled and original(*args, **kwargs)
    choose.__wrapped__ = original
    moe_gemm.tile_in_one_scale_block = choose


def tflops(config, tokens, ms):
    return 6 * tokens * config.moe.top_k * config.hidden_size * config.moe.intermediate_size / ms / 1e9


def row(label, ms, value, unit):
    print(f"| {label} | {ms:.3f} | {value:,.0f} {unit} |", flush=True)


def main() -> int:
    torch.manual_seed(0)
    config = load_config("deepseek-v3")
    device = torch.device("cuda")
    print(torch.cuda.get_device_name(), torch.__version__)
    print("| point | ms | rate |\n|---|---|---|")
    fp8 = make_experts(config, 32, "fp8", device)
    tokens = 8192
    x, layout = random_routing(config, 32, tokens, device)
    reference = None
    for cfg in PREFILL:
        for enabled in (False, True):
            with_one_scale(enabled)
            try:
                out = fused_experts(fp8, x, layout, cfg)
                reference = out if reference is None else reference
                error = ((out.float() - reference.float()).norm() / reference.float().norm()).item()
                ms, _ = gpu_ms(lambda: fused_experts(fp8, x, layout, cfg))
                row(f"fp8 {tokens} {cfg.block_m}x{cfg.block_n}x{cfg.block_k} w{cfg.num_warps} s{cfg.num_stages} "
                    f"g{cfg.group_m}{' pers' if cfg.persistent else ''} one_scale={enabled} (rel diff {error:.1e})",
                    ms, tflops(config, tokens, ms), "TFLOP/s")
            except Exception as exc:  # a config that does not compile must not hide the others
                print(f"| fp8 {cfg} one_scale={enabled} | FAILED {type(exc).__name__}: {str(exc)[:120]} | |", flush=True)
    with_one_scale(True)
    gate_up, down = rowwise_baseline_weights(fp8)
    ms, _ = gpu_ms(lambda: scaled_grouped_mm_baseline(gate_up, down, x, layout.slots, 32))
    row(f"torch._scaled_grouped_mm fp8 rowwise {tokens}", ms, tflops(config, tokens, ms), "TFLOP/s")
    del gate_up, down
    for rows_ in (1, 32, 128):
        xd, layout_d = random_routing(config, 32, rows_, device)
        cfg = default_config(rows_ * config.moe.top_k)
        bytes_touched = int(torch.unique(layout_d.slots).numel()) * sum(
            p.numel() * p.element_size() for p in fp8.parameters()) // 32
        for enabled in (False, True):
            with_one_scale(enabled)
            ms, _ = gpu_ms(lambda: fused_experts(fp8, xd, layout_d, cfg))
            row(f"fp8 decode {rows_} tokens, default config, one_scale={enabled}", ms, bytes_touched / ms / 1e9, "GB/s")
    with_one_scale(True)
    del fp8
    torch.cuda.empty_cache()
    bf16 = make_experts(config, 32, "bf16", device)
    for cfg in BF16:
        try:
            ms, _ = gpu_ms(lambda: fused_experts(bf16, x, layout, cfg))
            row(f"bf16 {tokens} {cfg}", ms, tflops(config, tokens, ms), "TFLOP/s")
        except Exception as exc:
            print(f"| bf16 {cfg} | FAILED {type(exc).__name__}: {str(exc)[:120]} | |", flush=True)
    ms, _ = gpu_ms(lambda: grouped_mm_baseline(bf16, x, layout.slots))
    row(f"torch._grouped_mm bf16 {tokens}", ms, tflops(config, tokens, ms), "TFLOP/s")
    a = torch.randn(16384, 7168, device=device).to(torch.float8_e4m3fn)
    b = torch.randn(4096, 7168, device=device).to(torch.float8_e4m3fn)
    one = torch.ones((), device=device)
    ms, _ = gpu_ms(lambda: torch._scaled_mm(a, b.t(), one, one, out_dtype=torch.bfloat16))
    row("dense torch._scaled_mm fp8 16384x7168x4096 (yardstick)", ms, 2 * 16384 * 7168 * 4096 / ms / 1e9, "TFLOP/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
