"""Running Triton kernels on the CPU in tests: TRITON_INTERPRET=1 (set before any @triton.jit runs),
and a fix for the interpreter's bf16 tl.dot, which multiplies raw bf16 bit patterns (triton issue 11584)."""

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
