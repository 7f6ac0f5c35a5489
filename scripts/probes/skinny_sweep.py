"""The decode-size linear kernel against F.linear (cuBLAS) at the real models' dense shapes, every block
config timed as CUDA-graph replays over enough weight copies that none stays in L2 (as in a decode step,
where each weight is read once). Usage: PYTHONPATH=. python3 scripts/probes/skinny_sweep.py"""
import itertools

import torch
import torch.nn.functional as F

from moeserve.bench.timing import time_ms
from moeserve.kernels.skinny_gemm import SkinnyConfig, skinny_config, skinny_linear

SHAPES = {"v2lite q_proj": (3072, 2048), "v2lite kv_a": (576, 2048), "v2lite o_proj": (2048, 2048),
          "v2lite shared gate_up": (5632, 2048), "v2lite shared down": (2048, 2816), "qwen3 qkv": (5120, 2048),
          "qwen3 o_proj": (2048, 4096), "qwen3 router": (128, 2048), "v2lite router fp32": (64, 2048),
          "v3 q_b": (24576, 1536), "v2lite lm_head": (102400, 2048)}
CONFIGS = [SkinnyConfig(n, k, 4, s) for n, k, s in itertools.product((16, 32, 64), (128, 256, 512), (3, 4, 6))]


def per_call_ms(fn_of_copy, copies: int) -> float:
    graph = torch.cuda.CUDAGraph()
    for i in range(copies):
        fn_of_copy(i)
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        for i in range(copies):
            fn_of_copy(i)
    return time_ms(graph.replay, iterations=10, warmup=2) / copies


print(f"{'shape':24} {'M':>2} {'torch us':>9} {'TB/s':>5} {'default us':>10} {'TB/s':>5} {'best us':>8} {'TB/s':>5}  best config")
for name, (n, k) in SHAPES.items():
    dtype = torch.float32 if "fp32" in name else torch.bfloat16
    nbytes = n * k * (4 if dtype == torch.float32 else 2)
    copies = max(2, min(64, 400 * 2**20 // nbytes))
    weights = [torch.randn(n, k, device="cuda").to(dtype) for _ in range(copies)]
    for m in (1, 8):
        x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
        ref = F.linear(x.float(), weights[0].float())
        torch_us = 1000 * per_call_ms(lambda i: F.linear(x.to(dtype), weights[i]), copies)
        results = {}
        for config in CONFIGS:
            try:
                out = skinny_linear(x, weights[0], config=config).float()
                if not ((out - ref).norm() <= 1e-2 * ref.norm()):
                    continue
                results[config] = 1000 * per_call_ms(lambda i: skinny_linear(x, weights[i], config=config), copies)
            except Exception as error:  # out of shared memory, etc.
                results.setdefault("errors", str(error)[:80])
        results.pop("errors", None)
        default = results.get(skinny_config(n, k), float("nan"))
        best = min(results, key=results.get)
        tbs = lambda us: nbytes / us / 1e6
        print(f"{name:24} {m:2d} {torch_us:9.2f} {tbs(torch_us):5.2f} {default:10.2f} {tbs(default):5.2f} "
              f"{results[best]:8.2f} {tbs(results[best]):5.2f}  {best}", flush=True)
