"""Where an NVFP4 dispatch's conversion to bf16 costs least: the receive kernel writing bf16 rows, then the experts
(the way before), against the experts' gate_up GEMM reading the NVFP4 rows as they arrived (Nvfp4Activations).
DeepSeek-V3 widths (hidden 7168, intermediate 2048), 256 / R local experts, each received row with 8 / R of its
8 experts here (uniform routing over R ranks), rows 64-byte aligned with metadata after them as in the p2p receive
area; bf16 and NVFP4 expert weights; CUDA-graph replays, median of 20.
Usage: PYTHONPATH=. python3 scripts/probes/nvfp4_activations_gemm.py [R ...] [--rows N,N,...]"""
import argparse

import torch

from moeserve.bench.timing import graph_of, time_ms
from moeserve.distributed.ep.token_formats import Nvfp4Format
from moeserve.kernels.ep_transport import nvfp4_tokens
from moeserve.kernels.fused_moe import fused_experts
from moeserve.kernels.row_layout import RowLayout
from moeserve.layers.moe.experts import Experts
from moeserve.quant.formats import make_quantized_weight
from moeserve.quant.nvfp4 import Nvfp4Activations

HIDDEN, INTERMEDIATE, EXPERTS, TOP_K = 7168, 2048, 256, 8


def experts_of(fmt: str, local: int) -> Experts:
    with torch.device("meta"):  # its fp32 parameters are replaced below, never made
        experts = Experts(local, HIDDEN, INTERMEDIATE)
    gate_up = torch.randn(local, 2 * INTERMEDIATE, HIDDEN, device="cuda", dtype=torch.bfloat16) / HIDDEN**0.5
    down = torch.randn(local, HIDDEN, INTERMEDIATE, device="cuda", dtype=torch.bfloat16) / INTERMEDIATE**0.5
    if fmt == "bf16":
        experts.gate_up_proj = torch.nn.Parameter(gate_up, requires_grad=False)
        experts.down_proj = torch.nn.Parameter(down, requires_grad=False)
        return experts
    del experts.gate_up_proj, experts.down_proj
    with torch.device("cuda"):
        experts.gate_up_proj = make_quantized_weight(fmt, (local, 2, INTERMEDIATE, HIDDEN))
        experts.down_proj = make_quantized_weight(fmt, (local, HIDDEN, INTERMEDIATE))
    experts.gate_up_proj.quantize_from(gate_up)  # a matrix at a time
    experts.down_proj.quantize_from(down)
    return experts


def received(rows: int, ranks: int, local: int):
    """rows NVFP4 tokens as a receive area holds them, and their layout (8 / ranks experts here a row)."""
    wire = Nvfp4Format()
    x = (torch.randn(rows, HIDDEN, device="cuda") * torch.rand(rows, 1, device="cuda") * 4).bfloat16()
    payload = wire.pack(x)
    row_bytes = -(-(payload.shape[1] + 8 * TOP_K) // 64) * 64
    area = torch.zeros(rows, row_bytes, dtype=torch.uint8, device="cuda")
    area[:, : payload.shape[1]] = payload
    here = TOP_K // ranks
    slots = torch.full((rows, TOP_K), -1, dtype=torch.int32, device="cuda")
    slots[:, :here] = torch.rand(rows, local, device="cuda").argsort(dim=1)[:, :here].int()
    layout = RowLayout(slots, torch.rand(rows, TOP_K, device="cuda"))
    return Nvfp4Activations(area[:, : payload.shape[1]], HIDDEN, torch.bfloat16), layout


def timed_us(fn) -> float:
    replay = graph_of(fn)
    return 1000 * time_ms(replay or fn, iterations=20, warmup=3)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("ranks", nargs="*", type=int, default=[2, 8])
    parser.add_argument("--rows", default="256,1024,8192")
    args = parser.parse_args()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    print(f"{'R':>2} {'weights':7} {'rows':>6} {'receive us':>10} {'experts bf16 rows us':>20} {'experts nvfp4 rows us':>21}"
          f" {'before us':>9} {'after us':>8} {'after/before':>12} {'max |diff|':>10}")
    for ranks in args.ranks:
        local = EXPERTS // ranks
        for fmt in ("bf16", "nvfp4"):
            experts = experts_of(fmt, local)
            for rows in map(int, args.rows.split(",")):
                tokens, layout = received(rows, ranks, local)
                bf16_rows = nvfp4_tokens(tokens.rows, HIDDEN, torch.bfloat16)
                receive = timed_us(lambda: nvfp4_tokens(tokens.rows, HIDDEN, torch.bfloat16))
                on_bf16 = timed_us(lambda: fused_experts(experts, bf16_rows, layout))
                on_nvfp4 = timed_us(lambda: fused_experts(experts, tokens, layout))
                diff = (fused_experts(experts, tokens, layout).float()
                        - fused_experts(experts, bf16_rows, layout).float()).abs().max().item()
                before, after = receive + on_bf16, on_nvfp4
                print(f"{ranks:2d} {fmt:7} {rows:6d} {receive:10.1f} {on_bf16:20.1f} {on_nvfp4:21.1f} {before:9.1f}"
                      f" {after:8.1f} {after / before:12.3f} {diff:10.3g}", flush=True)
            experts = None  # its memory back before the next weights
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
