"""Host-to-device copies that never make the host wait for the device: a pinned host buffer, copied
with non_blocking=True; the host waits only before rewriting it, for the previous copy out of it."""

import numpy as np
import torch


class HostToDevice:
    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device):
        self.device = torch.device(device)
        on_gpu = self.device.type == "cuda"
        self.host = torch.zeros(shape, dtype=dtype, pin_memory=on_gpu)
        self.view = self.host.numpy()
        self.copied = torch.cuda.Event() if on_gpu else None  # the last copy out of the buffer

    def writable(self) -> np.ndarray:
        """The host buffer, once the previous copy out of it has finished."""
        if self.copied is not None:
            self.copied.synchronize()
        return self.view

    def send(self, rows: int, into: torch.Tensor | None = None) -> torch.Tensor:
        """The buffer's first `rows` rows on the device (a copy of them on a CPU device), in a new tensor or
        copied into the first rows of `into` (a persistent device buffer, such as CUDA graphs read)."""
        if into is None:
            into = torch.empty_like(self.host[:rows], device=self.device)
        on_device = into[:rows]
        on_device.copy_(self.host[:rows], non_blocking=self.copied is not None)
        if self.copied is not None:
            self.copied.record()
        return on_device
