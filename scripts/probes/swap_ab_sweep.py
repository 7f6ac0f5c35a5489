"""Decode shapes with the product computed transposed (GemmConfig.swap_ab: W @ a^T, so the weights fill the wgmma's
64-row side and a few tokens its narrow side) against the kernel's current decode configs:
  dense: quantized linears (FP8 W8A8, NVFP4 W4A16) at 1, 4 and 16 rows on DeepSeek-V3's and V2-Lite's shapes, beside
         bf16 cuBLAS on the same shape, as CUDA-graph replays over enough weight copies to defeat L2;
  moe:   the fused experts of a DeepSeek-V3 layer (32 local experts) at 1-128 tokens, bf16 / FP8 / NVFP4.
Every variant is checked against the reference (relative error <= 1e-2) before it is timed.
Usage (device): PYTHONPATH=. python3 scripts/probes/swap_ab_sweep.py [dense|moe|all] [fp8,nvfp4]"""
import itertools
import sys

import torch
import torch.nn.functional as F

from moeserve.bench.moe import expert_bytes, gpu_ms, make_experts, random_routing
from moeserve.bench.timing import per_copy_ms
from moeserve.kernels.fused_moe import fused_experts
from moeserve.kernels.moe_gemm import GemmConfig, weight_format
from moeserve.kernels.quant_linear import dense_config, quantized_gemm
from moeserve.kernels.tuning import tuned_config
from moeserve.loader.model_loader import load_config
from moeserve.ops.linear import quantized_linear_reference
from moeserve.quant.formats import quantized

DENSE_SHAPES = {"v3 q_b": (24576, 1536), "v3 o_proj": (7168, 16384), "v3 kv_a": (576, 7168),
                "v3 dense down": (7168, 18432), "v2lite q_proj": (3072, 2048), "v2lite o_proj": (2048, 2048)}
FORMATS = [f for f in ("fp8", "nvfp4") if f in (sys.argv[2] if len(sys.argv) > 2 else "fp8,nvfp4").split(",")]


def close(actual: torch.Tensor, expected: torch.Tensor) -> bool:
    return bool(torch.isfinite(actual).all() and (actual.float() - expected).norm() <= 1e-2 * expected.norm())


def variants(fmt: str, moe: bool = False):
    """The transposed product's blocks; for NVFP4 both forms, K steps of 128 and 256 (its conversion's cost per step)."""
    if fmt == "nvfp4":
        for swap_ab, block_n, block_k, split_k in itertools.product((False, True), (64, 128), (128, 256), (1, 2, 4)):
            yield GemmConfig(block_m=16, block_n=block_n, block_k=block_k, split_k=split_k, swap_ab=swap_ab)
    else:
        for block_n, split_k in itertools.product((64, 128), (1, 2, 4, 8)):
            yield GemmConfig(block_m=16, block_n=block_n, block_k=128, split_k=split_k, swap_ab=True)
    if moe:  # more rows per expert block at 32+ tokens: each weight tile read once
        for block_m in (32, 64):
            yield GemmConfig(block_m=block_m, block_n=128, block_k=128, swap_ab=True)


def best_variant(times: dict, now: GemmConfig, label: str) -> GemmConfig | None:
    """The fastest variant other than `now`; None (said) when `now` or every variant failed."""
    others = {c: t for c, t in times.items() if c != now}
    if now not in times or not others:
        print(f"{label}: the current config or every variant failed (above)")
        return None
    return min(others, key=others.get)


def short(config: GemmConfig) -> str:
    return (f"{config.block_m}x{config.block_n}x{config.block_k} split {config.split_k}"
            + (" swapped" if config.swap_ab else ""))


def bandwidth():
    """The card's yardsticks, this run: a device-to-device copy (bytes read + written) and a read-only sum."""
    from moeserve.bench.timing import time_ms

    x = torch.empty(2**30, dtype=torch.bfloat16, device="cuda").normal_()
    y = torch.empty_like(x)
    copy = 2 * x.numel() * 2 / time_ms(lambda: y.copy_(x)) / 1e9
    read = x.numel() * 2 / time_ms(lambda: torch.sum(x, dtype=torch.float32)) / 1e9
    print(f"yardsticks: copy {copy:.2f} TB/s (read + write), torch.sum read {read:.2f} TB/s", flush=True)
    del x, y
    torch.cuda.empty_cache()


def dense():
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(f"{'shape':14} {'fmt':5} {'rows':>4} {'MB':>6} {'bf16 us':>8} {'now us':>7} {'TB/s':>5} {'best us':>8} {'TB/s':>5}"
          "  best variant")
    for (name, (n, k)), fmt in itertools.product(DENSE_SHAPES.items(), FORMATS):
        copies = max(2, min(32, 400 * 2**20 // (n * k * 2)))
        bf16 = [torch.randn(n, k, device="cuda").bfloat16() for _ in range(copies)]
        weights = [quantized(fmt, w.float() * 0.02) for w in bf16]
        megabytes = sum(t.numel() * t.element_size() for t in weights[0].parameters()) / 1e6  # scales included
        for rows in (1, 4, 16):
            x = torch.randn(rows, k, device="cuda").bfloat16()
            expected = quantized_linear_reference(x, weights[0]).float()
            cublas = 1000 * per_copy_ms(lambda i: F.linear(x, bf16[i]), copies)
            now = dense_config(rows, n, k, sms, weight_format(weights[0]))
            times = {}
            for config in [now, *variants(fmt)]:
                try:
                    if not close(quantized_gemm(x, weights[0], config=config), expected):
                        print(f"  {name} {fmt} {rows} {config}: WRONG")
                        continue
                    times[config] = 1000 * per_copy_ms(lambda i: quantized_gemm(x, weights[i], config=config), copies)
                except Exception as error:  # shared memory, etc.
                    print(f"  {name} {fmt} {rows} {config}: {type(error).__name__} {str(error)[:100]}")
            best = best_variant(times, now, f"{name:14} {fmt:5} {rows:4d}")
            if best:
                print(f"{name:14} {fmt:5} {rows:4d} {megabytes:6.1f} {cublas:8.1f} {times[now]:7.1f} "
                      f"{megabytes / times[now]:5.2f} {times[best]:8.1f} {megabytes / times[best]:5.2f}"
                      f"  {short(best)}", flush=True)
        del bf16, weights
        torch.cuda.empty_cache()


def moe():
    config = load_config("deepseek-v3")
    local_experts = 32
    print(f"{'fmt':5} {'tokens':>6} {'now ms':>7} {'TB/s':>5} {'best ms':>8} {'TB/s':>5}  best variant; now = the config used today")
    for fmt in ("bf16", *FORMATS):
        experts = make_experts(config, local_experts, fmt, "cuda")
        per_expert = expert_bytes(experts)
        for tokens in (1, 8, 32, 128):
            torch.manual_seed(tokens)
            x, layout = random_routing(config, local_experts, tokens, "cuda")
            touched = int(torch.unique(layout.slots).numel())
            now = tuned_config(fmt, config.hidden_size, config.moe.intermediate_size, layout.slots.numel(), local_experts)
            expected = experts.reference(x, layout).float()  # the torch loop
            times = {}
            for candidate in [now, *variants(fmt, moe=True)]:
                try:
                    if not close(fused_experts(experts, x, layout, candidate), expected):
                        print(f"  {fmt} {tokens} {candidate}: WRONG")
                        continue
                    ms, captured = gpu_ms(lambda: fused_experts(experts, x, layout, candidate))
                    if captured:
                        times[candidate] = ms
                except Exception as error:
                    print(f"  {fmt} {tokens} {candidate}: {type(error).__name__} {str(error)[:100]}")
            best = best_variant(times, now, f"{fmt:5} {tokens:6d}")
            if best:
                gb = touched * per_expert / 1e9
                print(f"{fmt:5} {tokens:6d} {times[now]:7.3f} {gb / times[now]:5.2f} {times[best]:8.3f} "
                      f"{gb / times[best]:5.2f}  {short(best)}; now {short(now)}", flush=True)
        del experts
        torch.cuda.empty_cache()


if __name__ == "__main__":
    part = sys.argv[1] if len(sys.argv) > 1 else "all"
    print(torch.cuda.get_device_name(), torch.__version__)
    bandwidth()
    if part in ("dense", "all"):
        dense()
    if part in ("moe", "all"):
        moe()
