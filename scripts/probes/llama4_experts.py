"""tiny-llama4's experts on CUDA: fused_experts against the reference on random rows, by row count."""
import torch

from moeserve.kernels.fused_moe import fused_experts
from moeserve.kernels.row_layout import RowLayout
from moeserve.layers.moe.experts import Experts
from moeserve.llm import LLM

llm = LLM("tiny-llama4", device="cuda", enforce_eager=True)
experts = next(m for m in llm.engine.runner.model.modules() if isinstance(m, Experts))
print("gate_up", tuple(experts.gate_up_proj.shape), experts.gate_up_proj.dtype, "down", tuple(experts.down_proj.shape),
      experts.gate_up_proj.stride(), experts.down_proj.stride())
for rows in (3, 17, 40, 70, 130):
    x = torch.randn(rows, experts.down_proj.shape[1], device="cuda")
    slots = torch.randint(0, experts.num_experts, (rows, 1), device="cuda")
    layout = RowLayout(slots, torch.ones(rows, 1, device="cuda"))
    got, want = fused_experts(experts, x, layout), experts.reference(x, layout)
    print("llama4-experts rows", rows, "max diff", (got - want).abs().max().item(), "max", want.abs().max().item())
