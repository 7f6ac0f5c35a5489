"""Dispatch / combine: the step between the router and the experts.

`dispatch(x, topk_ids, topk_weights) -> (rows, layout, handle)`: the rows this rank's experts
process and, for each row, its local expert slots and weights (a RowLayout); the experts return
each row's weighted sum; `combine(y, handle) -> out` brings those back to token order. On one device
the rows are the tokens themselves; expert-parallel dispatchers (moeserve.distributed.ep) move rows
between ranks behind the same interface. Rows carry their format: an FP8 or NVFP4 dispatch hands them on as
`Fp8Activations` / `Nvfp4Activations` (quantized as they travelled), which the experts' kernels read as they are.

Each exchange also comes in halves, so that other work runs while tokens travel: `dispatch_send(x, topk_ids,
topk_weights, micro_batch) -> sent`, `dispatch_recv(sent) -> (rows, layout, handle)`, `combine_send(y, handle) ->
sent`, `combine_recv(sent) -> out`. `micro_batch` tells exchanges in flight at once apart (two-batch overlap). A
dispatcher that cannot split an exchange does all of it in the send half. `results_buffer(handle)` says where the
experts should write their output (None: anywhere), so that a transport whose peers read the results where they lie
gets them without a copy.
"""

import torch

from moeserve.kernels.row_layout import RowLayout


class Dispatcher:
    """The halves of a dispatcher that has only the whole calls: everything happens in the send half."""

    def dispatch_send(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, micro_batch: int = 0):
        return self.dispatch(x, topk_ids, topk_weights)

    def dispatch_recv(self, sent):
        return sent

    def combine_send(self, y: torch.Tensor, handle):
        return self.combine(y, handle)

    def combine_recv(self, sent) -> torch.Tensor:
        return sent

    def results_buffer(self, handle) -> torch.Tensor | None:
        return None


class LocalDispatcher(Dispatcher):
    """`token_format` (optional) passes each token through a wire format's quantization, as an
    expert-parallel dispatcher would: the single-rank reference for quantized dispatch."""

    def __init__(self, num_experts: int, token_format=None):
        self.num_experts = num_experts
        self.token_format = token_format

    def dispatch(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor):
        # x: [T, H], topk_ids / topk_weights: [T, K]
        if self.token_format is not None:
            x = self.token_format.receive(self.token_format.pack(x), x.shape[1], x.dtype)  # as an EP rank receives it
        return x, RowLayout(topk_ids, topk_weights.float()), None

    def combine(self, y: torch.Tensor, handle) -> torch.Tensor:
        return y
