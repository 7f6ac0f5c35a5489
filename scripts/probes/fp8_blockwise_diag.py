import torch
from moeserve.quant.formats import quantized
from moeserve.quant.fp8 import quantize_fp8_groups
from moeserve.bench.timing import time_ms, graph_of
torch.manual_seed(0)
col = lambda s: s.t().contiguous().t()
for (m, n, k) in [(128, 1024, 768), (128, 1024, 1024), (128, 4096, 7168), (256, 512, 2048)]:
    w = quantized("fp8", torch.randn(n, k, device="cuda") * 0.02)
    x = torch.randn(m, k, device="cuda").bfloat16()
    a, sa = quantize_fp8_groups(x)
    sw = w.scale
    af, wf = a.float(), w.values.float()
    def ref(sa_, sw_):
        return (af * sa_.repeat_interleave(128, 1)) @ (wf * sw_.repeat_interleave(128, 0).repeat_interleave(128, 1)).t()
    for label, sa_, sw_ in [("ones", torch.ones_like(sa), torch.ones_like(sw)), ("a only", sa, torch.ones_like(sw)),
                            ("w only", torch.ones_like(sa), sw), ("both", sa, sw),
                            ("w random", torch.ones_like(sa), torch.rand_like(sw) + 0.5),
                            ("a random", torch.rand_like(sa) + 0.5, torch.ones_like(sw))]:
        expected = ref(sa_, sw_)
        for bl, sb in (("b=sw.t()", sw_.t()), ("b=sw.t().contig.t().t()?", col(sw_.t()))):
            try:
                out = torch._scaled_mm(a, w.values.t(), col(sa_), sb, out_dtype=torch.bfloat16).float()
                err = ((out - expected).norm() / expected.norm()).item()
                # also: is it the transposed-scale interpretation?
                alt = ref(sa_, sw_.t().contiguous().view(sw_.shape) if sw_.shape[0] == sw_.shape[1] else sw_)
                print(m, n, k, label, bl, f"err {err:.3e}", flush=True)
            except Exception as e:
                print(m, n, k, label, bl, type(e).__name__, str(e)[:80], flush=True)
# rate at a big shape, ones scales
m, n, k = 8192, 24576, 1536
w = quantized("fp8", torch.randn(n, k, device="cuda") * 0.02); x = torch.randn(m, k, device="cuda").bfloat16()
a, sa = quantize_fp8_groups(x)
try:
    fn = lambda: torch._scaled_mm(a, w.values.t(), col(sa), w.scale.t(), out_dtype=torch.bfloat16)
    ms = time_ms(graph_of(fn) or fn)
    print("rate 8192x1536->24576", ms, 2 * m * n * k / ms / 1e9, "TFLOP/s")
    m, n, k = 8192, 7168, 16384
    w = quantized("fp8", torch.randn(n, k, device="cuda") * 0.02); x = torch.randn(m, k, device="cuda").bfloat16()
    a, sa = quantize_fp8_groups(x)
    fn = lambda: torch._scaled_mm(a, w.values.t(), col(sa), w.scale.t(), out_dtype=torch.bfloat16)
    ms = time_ms(graph_of(fn) or fn)
    print("rate 8192x16384->7168", ms, 2 * m * n * k / ms / 1e9, "TFLOP/s")
except Exception as e:
    print("rate", type(e).__name__, str(e)[:200])
