"""Where the one-pass FP8 activation quantization kernel and quantize_fp8_groups disagree on CUDA, if anywhere:
tests/gpu/test_quant_cuda.py::test_activation_quantization_kernel_equals_torch_bit_for_bit_on_cuda failed once in two
runs on an H100 (2026-12-07) on random inputs. Prints, for 20 random draws, each mismatching element: the input, the
group's scales, both codes.

    PYTHONPATH=. python3 scripts/probes/quantize_mismatch.py
"""
import torch

from moeserve.kernels.activation import quantize_fp8_activations
from moeserve.quant.fp8 import quantize_fp8_groups

for draw in range(20):
    torch.manual_seed(draw)
    x = (torch.randn(37, 7168, device="cuda") * torch.logspace(-4, 3, 7168, device="cuda")).bfloat16()
    if draw % 2:
        x[3, 500] = float("nan")
        x[4, :256] = 0
    values, scales = quantize_fp8_activations(x)
    want_values, want_scales = quantize_fp8_groups(x)
    bad = (values.view(torch.uint8) != want_values.view(torch.uint8)).nonzero().tolist()
    bad_scales = (scales.view(torch.int32) != want_scales.view(torch.int32)).nonzero().tolist()
    print(f"draw {draw}: {len(bad)} codes and {len(bad_scales)} scales differ", flush=True)
    for r, c in bad[:8]:
        g = c // 128
        print(f"  [{r},{c}] x={x[r, c].item()!r} scale ours={scales[r, g].item()!r} torch={want_scales[r, g].item()!r} "
              f"code ours={values.view(torch.uint8)[r, c].item():#04x} torch={want_values.view(torch.uint8)[r, c].item():#04x}")
