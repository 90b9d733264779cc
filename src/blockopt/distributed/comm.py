"""Where a reduction buffer travels: the tensors' device, or the current CUDA device for CPU tensors on
a process group without a CPU backend (CPU-offloaded parameters under NCCL)."""

from __future__ import annotations

import torch

__all__ = ["comm_device"]


def comm_device(group: object, device: torch.device) -> torch.device:
    """``device``, or the current CUDA device when ``device`` is the CPU and ``group``'s backend has no CPU
    support (NCCL)."""
    if device.type != "cpu":
        return device
    import torch.distributed as dist

    backend = str(dist.get_backend(group)).lower()
    if "gloo" in backend or "cpu" in backend or "mpi" in backend or not torch.cuda.is_available():
        return device
    return torch.device("cuda", torch.cuda.current_device())
