import functools

import torch


@functools.cache
def multiprocessors(device: torch.device) -> int:
    """The GPU's SM count, which sizes grids; 2 in the CPU interpreter (a few programs are enough there)."""
    device = torch.device(device)
    if device.type != "cuda":
        return 2
    return torch.cuda.get_device_properties(device).multi_processor_count


@functools.cache
def has_fp8(device: torch.device) -> bool:
    """Whether Triton kernels there may use float8 types: CUDA compute capability 8.9 (Ada, Hopper) and later, or the
    CPU interpreter."""
    device = torch.device(device)
    return device.type != "cuda" or torch.cuda.get_device_capability(device) >= (8, 9)
