"""Host -> device copies that do not make the host wait.

`torch.tensor(values, device="cuda")` and a plain `.to("cuda")` copy from pageable memory
and then wait until the device's stream has drained: in a decode loop, whose steps are
small, every such copy stalls the host on the step before. A copy from pinned memory with
`non_blocking=True` is queued on the stream like a kernel instead; torch's caching host
allocator keeps the pinned block alive until the copy has run.
"""
from __future__ import annotations

import torch
from torch import Tensor


def upload(host: Tensor, device: torch.device | str) -> Tensor:
    """host (a CPU tensor) on `device`, queued without a host-device synchronisation (on
    CUDA: host is first copied into pinned memory, so the caller may reuse it at once). On
    the CPU, host itself."""
    device = torch.device(device)
    if device.type == "cpu":
        return host
    if device.type != "cuda":  # pinned memory and its lifetime tracking are CUDA's
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)
