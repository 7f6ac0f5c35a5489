"""MoE ops: routing (logits -> top-k experts) and the experts' forward, per device."""

import torch

from moeserve.kernels.row_layout import RowLayout
from moeserve.quant.formats import dequantized_tokens
from moeserve.quant.fp8 import Fp8Activations
from moeserve.quant.nvfp4 import Nvfp4Activations


def moe_route(router, logits: torch.Tensor, counts: torch.Tensor | None = None,
              real_tokens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [T, E] -> (topk_ids [T, K] int64, topk_weights [T, K] fp32) by `router.moe`'s rule:
    the routing kernels on CUDA where they cover the rule, else `router.reference(logits)`.
    counts [E] int64, if given, goes up by one per chosen (token, expert) (the kernels count as they choose), for
    the first real_tokens tokens (int32 [1] on the device) if that is given: the rest pad a captured batch."""
    if logits.is_cuda:
        from moeserve.kernels import routing

        if routing.supports(router.moe):
            return routing.route(logits, router.moe, router.correction_bias, counts, real_tokens)
    topk_ids, topk_weights = router.reference(logits)
    if counts is not None:
        real = torch.ones_like(topk_ids)
        if real_tokens is not None:  # on the device: no sync
            real *= (torch.arange(topk_ids.shape[0], device=topk_ids.device) < real_tokens)[:, None]
        counts.scatter_add_(0, topk_ids.flatten(), real.flatten())
    return topk_ids, topk_weights


def moe_experts(experts, x: torch.Tensor | Fp8Activations | Nvfp4Activations, layout: RowLayout,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """x [R, H] (or rows quantized as an FP8 or NVFP4 dispatch receives them) -> [R, H], each row's weighted sum
    over its experts: the fused Triton kernels on CUDA (every weight format), else `experts.reference(x, layout)`."""
    if x.device.type == "cuda":
        from moeserve.kernels.fused_moe import fused_experts

        return fused_experts(experts, x, layout, out=out)
    y = experts.reference(dequantized_tokens(x), layout)
    return y if out is None else out.copy_(y)
