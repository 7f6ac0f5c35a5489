import torch
import torch.nn.functional as F
from torch import nn

from moeserve.kernels.row_layout import RowLayout
from moeserve.ops.moe import moe_experts
from moeserve.quant.formats import Fp8BlockWeight, weight_matrix
from moeserve.quant.fp8 import fp8_group_round_trip


class Experts(nn.Module):
    """E SwiGLU experts, fused: gate_up_proj [E, 2I, H] (gate rows, then up rows), down_proj [E, H, I].
    Quantized, they are QuantizedWeights of shape [E, 2, I, H] (gate and up scaled separately, as
    checkpoints store them) and [E, H, I].

    forward(x [R, H], layout, out=None) -> [R, H] (into out if given): each row's weighted sum over its experts,
    computed by the implementation moeserve.ops.moe chooses (on CUDA the fused Triton kernels); `reference` is the
    torch specification (fan out by expert, loop over experts) that runs elsewhere and that the kernels are tested
    against.
    FP8 block weights take FP8 activations (1x128 groups, W8A8) on every device, as the fused kernel
    does; NVFP4 weights take 16-bit activations (W4A16).
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.num_experts = num_experts
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))

    def forward(self, x: torch.Tensor, layout: RowLayout, out: torch.Tensor | None = None) -> torch.Tensor:
        return moe_experts(self, x, layout, out)

    def reference(self, x: torch.Tensor, layout: RowLayout) -> torch.Tensor:
        row, k = (layout.slots >= 0).nonzero(as_tuple=True)
        slot = layout.slots[row, k].long()
        order = torch.argsort(slot, stable=True)
        row, slot, weight = row[order], slot[order], layout.weights[row, k][order]
        ends = torch.bincount(slot, minlength=self.num_experts).cumsum(0).tolist()
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        for e, (start, end) in enumerate(zip([0] + ends[:-1], ends)):
            if end > start:
                rows = row[start:end]
                out.index_add_(0, rows, self.expert(e, x[rows]).float() * weight[start:end, None])
        return out.to(x.dtype)

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        w8a8 = isinstance(self.gate_up_proj, Fp8BlockWeight)
        # W8A8 as the kernel computes it: FP8 operands, products and scales in fp32; gate_up stored in x's dtype
        dtype = torch.float32 if w8a8 else x.dtype
        activations = fp8_group_round_trip if w8a8 else (lambda t: t)
        gate_up = weight_matrix(self.gate_up_proj, e, dtype).reshape(-1, x.shape[-1])  # [2I, H]
        gate, up = F.linear(activations(x).to(dtype), gate_up).to(x.dtype).float().chunk(2, dim=-1)
        hidden = activations(F.silu(gate) * up).to(dtype)
        return F.linear(hidden, weight_matrix(self.down_proj, e, dtype)).to(x.dtype)
