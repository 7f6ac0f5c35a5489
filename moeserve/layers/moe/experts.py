import torch
import torch.nn.functional as F
from torch import nn

from moeserve.quant.formats import weight_matrix


class Experts(nn.Module):
    """E SwiGLU experts, fused: gate_up_proj [E, 2I, H] (gate rows, then up rows), down_proj [E, H, I].
    Quantized, they are QuantizedWeights of shape [E, 2, I, H] (gate and up scaled separately, as
    checkpoints store them) and [E, H, I].

    Input rows arrive grouped by expert (`counts[e]` rows for expert e, in order); this is the torch
    reference that the grouped-GEMM kernels implement.
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.num_experts = num_experts
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        # x: [N, H] grouped by expert; counts: [E]
        out = torch.empty_like(x)
        ends = counts.cumsum(0).tolist()
        for e, (start, end) in enumerate(zip([0] + ends[:-1], ends)):
            if end > start:
                out[start:end] = self.expert(e, x[start:end])
        return out

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        gate_up = weight_matrix(self.gate_up_proj, e, x.dtype).reshape(-1, x.shape[-1])  # [2I, H]
        gate, up = F.linear(x, gate_up).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, weight_matrix(self.down_proj, e, x.dtype))
