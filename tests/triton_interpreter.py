"""Running Triton kernels on the CPU in tests: TRITON_INTERPRET=1 (set before any @triton.jit runs),
and fixes for the interpreter's bf16: tl.dot multiplies raw bf16 bit patterns (triton issue 11584), and
casts from fp32 to bf16 truncate where the GPU rounds to nearest even; casts from fp32 to E4M3 round ties up and
turn NaN into 384 (the GPU's conversion rounds ties to even, saturates at 448 and keeps NaN as 0x7F)."""

import os

import torch


def enable() -> None:
    if torch.cuda.is_available():
        return
    os.environ.setdefault("TRITON_INTERPRET", "1")
    try:
        import numpy as np
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:  # no triton: kernel tests skip
        return
    from moeserve.quant.fp8 import to_e4m3  # the GPU's fp32 -> E4M3 conversion, as our torch format writes it

    original = interpreter.InterpreterBuilder.create_dot

    def as_fp32(handle):
        if handle.dtype.scalar == tl.bfloat16:  # stored as uint16
            return (handle.data.astype(np.uint32) << 16).view(np.float32)
        return handle.data.astype(np.float32)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if tl.bfloat16 in (a.dtype.scalar, b.dtype.scalar):
            product = np.matmul(as_fp32(a), as_fp32(b), dtype=d.data.dtype)
            return interpreter.TensorHandle(product + d.data, d.dtype.scalar)
        return original(self, a, b, d, input_precision, max_num_imprecise_acc)

    interpreter.InterpreterBuilder.create_dot = create_dot
    original_cast = interpreter.InterpreterBuilder.cast_impl

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            bits = np.ascontiguousarray(src.data, dtype=np.float32).view(np.uint32).astype(np.uint64)
            rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
            rounded = np.where(np.isnan(src.data), np.uint16(0x7FC0), rounded)
            return interpreter.TensorHandle(rounded, tl.bfloat16)
        return original_cast(self, src, dst_type)

    interpreter.InterpreterBuilder.cast_impl = cast_impl
    original_fp_to_fp = interpreter.InterpreterBuilder.create_fp_to_fp

    def create_fp_to_fp(self, src, dst_type, rounding_mode):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.float8e4nv:  # as the GPU's cvt.rn.satfinite does
            codes = to_e4m3(torch.from_numpy(np.ascontiguousarray(src.data, dtype=np.float32)))
            return interpreter.TensorHandle(codes.view(torch.uint8).numpy(), tl.float8e4nv)
        return original_fp_to_fp(self, src, dst_type, rounding_mode)

    interpreter.InterpreterBuilder.create_fp_to_fp = create_fp_to_fp
