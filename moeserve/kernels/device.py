import functools

import torch


@functools.cache
def multiprocessors(device: torch.device) -> int:
    """The GPU's SM count, which sizes grids; 2 in the CPU interpreter (a few programs are enough there)."""
    device = torch.device(device)
    if device.type != "cuda":
        return 2
    return torch.cuda.get_device_properties(device).multi_processor_count
