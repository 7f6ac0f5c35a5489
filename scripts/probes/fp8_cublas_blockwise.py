"""Does torch._scaled_mm's DeepSeek block scaling (1x128 FP8 activations, 128x128 FP8 weights; cuBLAS >= 12.9) run
on this card, which scale layout does it take, and how fast is it beside our dense kernel, dequantize + cuBLAS and
bf16 cuBLAS on the same shape (CUDA-graph replays over enough weight copies that none stays in L2).

    PYTHONPATH=. python3 scripts/probes/fp8_cublas_blockwise.py
"""
import torch
import torch.nn.functional as F

from moeserve.bench.timing import per_copy_ms
from moeserve.kernels.quant_linear import quantized_gemm
from moeserve.ops.linear import dequantized_linear, quantized_linear, quantized_linear_reference
from moeserve.quant.formats import quantized
from moeserve.quant.fp8 import quantize_fp8_groups

SHAPES = {"q_b 1536->24576": (24576, 1536), "o_proj 16384->7168": (7168, 16384), "kv_a 7168->576": (576, 7168),
          "dense gate_up 7168->36864": (36864, 7168), "dense down 18432->7168": (7168, 18432)}


def column_major(s):
    return s.t().contiguous().t()


def layouts(a_scale, w_scale):
    yield "a [M,K/128] col-major, b w_scale.t()", column_major(a_scale), w_scale.t()
    yield "a [M,K/128] row-major, b w_scale.t()", a_scale.contiguous(), w_scale.t()


def blockwise(x, weight, layout_index):
    a, a_scale = quantize_fp8_groups(x)
    _, sa, sb = list(layouts(a_scale, weight.scale))[layout_index]
    return torch._scaled_mm(a, weight.values.t(), sa, sb, out_dtype=x.dtype)


def find_layout() -> int | None:
    torch.manual_seed(0)
    weight = quantized("fp8", torch.randn(1024, 1024, device="cuda") * 0.02)  # K = 768 computed wrongly (diag probe)
    found = None
    for rows in (1, 7, 8, 16, 17, 32, 64, 300):
        x = torch.randn(rows, 1024, device="cuda").bfloat16()
        expected = quantized_linear_reference(x, weight).float()
        for index, (name, _, _) in enumerate(layouts(*quantize_fp8_groups(x)[1:], weight.scale)):
            try:
                out = blockwise(x, weight, index).float()
                error = ((out - expected).norm() / expected.norm()).item()
                print(f"rows {rows:4d} {name}: rel error {error:.2e}", flush=True)
                if error < 1e-2 and found is None and rows >= 64:
                    found = index
            except Exception as exc:
                print(f"rows {rows:4d} {name}: {type(exc).__name__}: {str(exc)[:150]}", flush=True)
    for k in (256, 384, 512, 640, 768, 896, 1024, 1280, 1536, 2816, 7168):  # which K the block scaling computes right
        weight = quantized("fp8", torch.randn(512, k, device="cuda") * 0.02)
        x = torch.randn(128, k, device="cuda").bfloat16()
        expected = quantized_linear_reference(x, weight).float()
        try:
            error = ((blockwise(x, weight, found or 0).float() - expected).norm() / expected.norm()).item()
            print(f"K {k:5d} ({k // 128} blocks): rel error {error:.2e}", flush=True)
        except Exception as exc:
            print(f"K {k:5d}: {type(exc).__name__}: {str(exc)[:100]}", flush=True)
    return found


def main():
    print(torch.cuda.get_device_name(), torch.__version__, "cuBLAS", torch.backends.cuda.preferred_blas_library())
    index = find_layout()
    if index is None:
        print("no layout works")
        return
    print(f"\n| shape | rows | quantized_linear us (TFLOP/s; cuBLAS block scaling from 128 rows) | Triton kernel us | dequant + cuBLAS us | bf16 cuBLAS us |")
    print("|---|---|---|---|---|---|")
    for name, (n, k) in SHAPES.items():
        copies = max(2, min(8, 400 * 2**20 // (n * k)))
        dense = [torch.randn(n, k, device="cuda").bfloat16() for _ in range(copies)]
        weights = [quantized("fp8", w.float() * 0.02) for w in dense]
        for rows in (1, 16, 64, 128, 1024, 8192):
            x = torch.randn(rows, k, device="cuda").bfloat16()
            cells = []
            for fn in (lambda i: quantized_linear(x, weights[i]), lambda i: quantized_gemm(x, weights[i]),
                       lambda i: dequantized_linear(x, weights[i]), lambda i: F.linear(x, dense[i])):
                try:
                    cells.append(1000 * per_copy_ms(fn, copies))
                except Exception as exc:
                    print(f"  {name} {rows}: {type(exc).__name__}: {str(exc)[:120]}")
                    cells.append(float("nan"))
            flops = 2 * rows * n * k
            print(f"| {name} | {rows} | {cells[0]:.1f} ({flops / cells[0] / 1e6:,.0f}) | {cells[1]:.1f} "
                  f"({flops / cells[1] / 1e6:,.0f}) | {cells[2]:.1f} | {cells[3]:.1f} ({flops / cells[3] / 1e6:,.0f}) |",
                  flush=True)
        del dense, weights
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
