"""How tokens travel between ranks in expert-parallel dispatch: one contiguous uint8 payload per
token, so a dispatcher sends rows of bytes whatever the format (gloo rejects float8 tensors anyway).

Byte layout of one token's payload, hidden size H (a multiple of 128 for the quantized formats):

| format | bytes | layout |
|---|---|---|
| bf16 | 2H | H bfloat16 values: unquantized, in the activation dtype (fp32 rows, 4H bytes, in fp32 runs) |
| fp8 | H + H/32 | H float8_e4m3fn values, then H/128 float32 scales (one per 128 channels, a multiplier: x ~= value * scale) |
| nvfp4 | H/2 + H/16 + 4 | H/2 bytes of E2M1 codes (element 2i in the low nibble), then H/16 float8_e4m3fn block scales (one per 16), then one float32 global scale |

All multi-byte values are little-endian. `receive` hands the tokens on as the experts take them: quantized tokens as
zero-copy views of the payload (`Fp8Activations`: FP8 experts multiply them as they arrived, others dequantize;
`Nvfp4Activations`: bf16 and NVFP4 experts turn them into bf16 inside their first GEMM, FP8 experts dequantize them),
bf16 tokens as a tensor (a view where the rows' stride allows).
NVFP4's global scale is per token (amax of the token / 2688, at least 2^-100). A NaN in a token makes that token's
scales NaN: it propagates, it is never hidden.
"""

import math

import torch

from moeserve.quant.fp8 import Fp8Activations, quantize_fp8_groups
from moeserve.quant.nvfp4 import BLOCK as NVFP4_BLOCK
from moeserve.quant.nvfp4 import Nvfp4Activations, global_scale_of, quantize_nvfp4

DISPATCH_FORMATS = ("bf16", "fp8", "nvfp4")  # bf16: unquantized
FP8_GROUP = 128


def as_row_bytes(t: torch.Tensor) -> torch.Tensor:
    """[T, ...] -> [T, bytes per row] uint8, sharing memory when t is contiguous."""
    row_bytes = math.prod(t.shape[1:]) * t.element_size()
    if t.numel() == 0:  # empty tensors may carry strides that a dtype view refuses
        return torch.empty(t.shape[0], row_bytes, dtype=torch.uint8, device=t.device)
    return t.contiguous().view(torch.uint8).reshape(t.shape[0], row_bytes)


def _check_hidden(name: str, hidden: int) -> None:
    if hidden % FP8_GROUP:
        raise ValueError(f"the {name} token format needs a hidden size divisible by {FP8_GROUP}, got {hidden}")


class UnquantizedFormat:
    """Tokens as they are, in the activation dtype (the "bf16" format when serving in bf16)."""

    name = "bf16"

    def __init__(self, dtype: torch.dtype = torch.bfloat16):
        self.dtype = dtype

    def payload_bytes(self, hidden: int) -> int:
        return hidden * self.dtype.itemsize

    def pack(self, x: torch.Tensor) -> torch.Tensor:  # [T, H] -> [T, H * itemsize] uint8
        return as_row_bytes(x.to(self.dtype))

    def unpack(self, payload: torch.Tensor, hidden: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        return payload.contiguous().view(self.dtype).to(dtype)

    def receive(self, payload: torch.Tensor, hidden: int, dtype: torch.dtype = torch.bfloat16,
                rows_in_use: torch.Tensor | None = None) -> torch.Tensor:
        """A view of the received rows where they lie (rows strided by the metadata after them; the experts read
        rows by their stride) when that stride is a multiple of 16 values (else the GEMM's loads lose their vector
        width: a copy is cheaper), or a converted copy."""
        stride_bytes = payload.stride(0)
        if dtype == self.dtype and payload.stride(-1) == 1 and stride_bytes % (16 * self.dtype.itemsize) == 0:
            return payload.view(self.dtype)
        return self.unpack(payload, hidden, dtype)


class Fp8Format:
    name = "fp8"

    def payload_bytes(self, hidden: int) -> int:
        _check_hidden(self.name, hidden)
        return hidden + 4 * hidden // FP8_GROUP

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        _check_hidden(self.name, x.shape[-1])
        values, scales = quantize_fp8_groups(x, FP8_GROUP)
        return torch.cat((as_row_bytes(values), as_row_bytes(scales)), dim=1)

    def views(self, payload: torch.Tensor, hidden: int, dtype: torch.dtype = torch.bfloat16) -> Fp8Activations:
        """values [T, H] and scales [T, H/128]: views of the payload."""
        return Fp8Activations(payload[:, :hidden].view(torch.float8_e4m3fn),
                              payload[:, hidden : self.payload_bytes(hidden)].view(torch.float32), dtype)

    def unpack(self, payload: torch.Tensor, hidden: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        return self.views(payload, hidden, dtype).dequantize()

    def receive(self, payload: torch.Tensor, hidden: int, dtype: torch.dtype = torch.bfloat16,
                rows_in_use: torch.Tensor | None = None) -> Fp8Activations:
        return self.views(payload, hidden, dtype)


class Nvfp4Format:
    name = "nvfp4"

    def payload_bytes(self, hidden: int) -> int:
        _check_hidden(self.name, hidden)
        return hidden // 2 + hidden // NVFP4_BLOCK + 4

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        _check_hidden(self.name, x.shape[-1])
        global_scale = global_scale_of(x.abs().float().amax(dim=-1, keepdim=True))  # [T, 1]: per token
        packed, block_scales = quantize_nvfp4(x, global_scale)
        return torch.cat((as_row_bytes(packed), as_row_bytes(block_scales), as_row_bytes(global_scale)), dim=1)

    def views(self, payload: torch.Tensor, hidden: int, dtype: torch.dtype = torch.bfloat16,
              rows_in_use: torch.Tensor | None = None) -> Nvfp4Activations:
        return Nvfp4Activations(payload, hidden, dtype, rows_in_use)

    def unpack(self, payload: torch.Tensor, hidden: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        return self.views(payload, hidden, dtype).dequantize()

    def receive(self, payload: torch.Tensor, hidden: int, dtype: torch.dtype = torch.bfloat16,
                rows_in_use: torch.Tensor | None = None) -> Nvfp4Activations:
        """The rows where they lie (rows_in_use: which hold tokens), for the experts to read."""
        return self.views(payload, hidden, dtype, rows_in_use)


def token_format(name: str, activation_dtype: torch.dtype = torch.bfloat16):
    if name == "bf16":
        return UnquantizedFormat(activation_dtype)
    if name == "fp8":
        return Fp8Format()
    if name == "nvfp4":
        return Nvfp4Format()
    raise ValueError(f"unknown token format {name!r} (known: {', '.join(DISPATCH_FORMATS)})")
