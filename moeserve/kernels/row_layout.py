"""RowLayout: what a dispatcher hands the experts beside the rows, and what the expert kernels read."""

from dataclasses import dataclass

import torch


@dataclass
class RowLayout:
    """Which local experts each input row goes to: slots [R, K] (-1: none here) with weights [R, K] fp32."""

    slots: torch.Tensor
    weights: torch.Tensor
