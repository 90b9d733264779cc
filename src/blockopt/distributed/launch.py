"""Helpers for data-parallel training under ``torchrun``: initialise, wrap, write from rank 0.

Typical use (what ``blockopt bench --parallel fsdp|ddp`` does)::

    ctx = init_distributed()                      # reads RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT
    model = build_model(...).to(ctx.device)       # the same initial weights on every rank (same seed)
    model = wrap_model(model, "fsdp")             # or "ddp"
    opt = blockopt.AdamMini(unwrap(model), ...)   # after wrapping: FSDP2 replaces parameters by DTensors
    for step, x in enumerate(batches):            # each rank takes its share: shard_batch(x, ctx)
        ...
        if ctx.is_main: write_on_rank0(path, text)
    cleanup()
    exit_process(0)                               # a script's last line: see exit_process for why

World size, rank and device come from the process group and torchrun's
environment, never from the number of visible GPUs. The backend is NCCL when
the device is CUDA and gloo otherwise (CPU runs, tests).
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..utils import atomic_write_bytes, atomic_write_text

__all__ = [
    "DistContext",
    "all_reduce_mean",
    "barrier",
    "cleanup",
    "exit_process",
    "init_distributed",
    "is_main_process",
    "shard_batch",
    "torchrun_env",
    "unwrap",
    "wrap_model",
    "write_on_rank0",
]

PARALLEL_CHOICES = ("fsdp", "ddp")
_ran_collectives = [False]  # set by init_distributed: see exit_process


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: ``rank`` of ``world_size``, its ``local_rank`` and ``device``."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def torchrun_env() -> dict[str, int] | None:
    """``{"rank", "world_size", "local_rank"}`` from torchrun's variables, or ``None`` outside torchrun."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    try:
        return {"rank": int(os.environ["RANK"]), "world_size": int(os.environ["WORLD_SIZE"]),
                "local_rank": int(os.environ.get("LOCAL_RANK", os.environ["RANK"]))}
    except ValueError as e:
        raise ValueError(f"Invalid torchrun environment: {e}") from None


def init_distributed(device: str | torch.device | None = None, backend: str | None = None) -> DistContext:
    """Initialise the default process group from torchrun's environment (idempotent).

    Args:
        device: ``"cpu"`` or ``"cuda"`` (default: CUDA when available). On CUDA
            the process uses ``cuda:LOCAL_RANK``.
        backend: default ``"nccl"`` for CUDA, ``"gloo"`` for CPU.

    Raises ``RuntimeError`` outside torchrun (no ``RANK``/``WORLD_SIZE``).
    """
    import torch.distributed as dist

    env = torchrun_env()
    if env is None:
        raise RuntimeError(
            "data-parallel runs need torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, "
            "MASTER_PORT): launch with `torchrun --nproc-per-node N ...`"
        )
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda":
        dev = torch.device("cuda", env["local_rank"])
        torch.cuda.set_device(dev)
    elif dev.type != "cpu":
        raise ValueError(f"Invalid device for a data-parallel run: {dev}; allowed: cpu, cuda")
    backend = backend or ("nccl" if dev.type == "cuda" else "gloo")
    if not dist.is_initialized():
        kwargs: dict[str, Any] = {}
        if dev.type == "cuda":
            kwargs["device_id"] = dev
        dist.init_process_group(backend, rank=env["rank"], world_size=env["world_size"], **kwargs)
    _ran_collectives[0] = True
    return DistContext(dist.get_rank(), dist.get_world_size(), env["local_rank"], dev, str(dist.get_backend()))


def _shard_roots(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a model: every child of every ``nn.ModuleList`` (transformer layers)."""
    return [child for m in model.modules() if isinstance(m, nn.ModuleList) for child in m]


def wrap_model(model: nn.Module, parallel: str, *, offload: bool = False, mixed_precision: Any = None,
               device: torch.device | None = None) -> nn.Module:
    """Make ``model`` data parallel; build the optimizer *after* this.

    ``"fsdp"``: FSDP2 ``fully_shard`` on every child of every ``nn.ModuleList``
    (the transformer blocks), then on the root; the model is changed in place
    (parameters become DTensors sharded along dim 0) and returned.
    ``offload=True`` adds ``CPUOffloadPolicy`` (parameters, gradients and
    optimizer state on the CPU, the optimizer step on the CPU; ``pin_memory``
    only when CUDA is available). ``mixed_precision`` is passed on as FSDP2's
    ``mp_policy``.

    ``"ddp"``: ``DistributedDataParallel``; returns the wrapper (use
    :func:`unwrap` for the optimizer and checkpoints). AdamMini needs nothing
    special: gradients are already averaged, every rank steps the full
    parameters identically.
    """
    import torch.distributed as dist

    if parallel not in PARALLEL_CHOICES:
        raise ValueError(f"Invalid parallel: {parallel!r}; allowed: {', '.join(PARALLEL_CHOICES)}")
    if not dist.is_initialized():
        raise RuntimeError("wrap_model needs an initialised process group: call init_distributed() first")
    if parallel == "ddp":
        if offload or mixed_precision is not None:
            raise ValueError("Invalid options for parallel='ddp': offload and mixed_precision are FSDP2 options")
        from torch.nn.parallel import DistributedDataParallel as DDP

        dev = device or next(model.parameters()).device
        return DDP(model, device_ids=[dev] if dev.type == "cuda" else None)
    from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

    kwargs: dict[str, Any] = {}
    if offload:
        kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=torch.cuda.is_available())
    if mixed_precision is not None:
        kwargs["mp_policy"] = mixed_precision
    for block in _shard_roots(model):
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside a DDP wrapper (FSDP2 models are their own module)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    return model.module if isinstance(model, DDP) else model


def shard_batch(x: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """This rank's contiguous share of a global batch (dim 0 must divide by the world size)."""
    if x.shape[0] % ctx.world_size:
        raise ValueError(f"Invalid batch size {x.shape[0]}: it must divide by the world size {ctx.world_size}")
    per = x.shape[0] // ctx.world_size
    return x[ctx.rank * per:(ctx.rank + 1) * per]


def all_reduce_mean(value: float | torch.Tensor, device: torch.device | None = None) -> float:
    """Mean over ranks of a scalar (e.g. the loss, for logging); the value itself outside a process group."""
    import torch.distributed as dist

    t = (value.detach().double().reshape(()) if isinstance(value, torch.Tensor)
         else torch.tensor(float(value), dtype=torch.float64))
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return float(t)
    t = t.to(device or (torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl"
                        else torch.device("cpu")))
    dist.all_reduce(t)
    return float(t) / dist.get_world_size()


def is_main_process() -> bool:
    """Rank 0, or a process with no process group."""
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0


def write_on_rank0(path: str | os.PathLike, data: str | bytes) -> bool:
    """Write ``data`` to ``path`` atomically from rank 0 only; returns whether this process wrote."""
    if not is_main_process():
        return False
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    (atomic_write_bytes if isinstance(data, bytes) else atomic_write_text)(path, data)
    return True


def barrier() -> None:
    """``dist.barrier()`` when a process group exists; nothing otherwise."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def cleanup() -> None:
    """Destroy the default process group if there is one."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def exit_process(code: int) -> None:
    """End a process that ran a process group: flush, then ``os._exit(code)``, without
    interpreter finalization.

    Why: ``destroy_process_group()`` does not always destroy the backend. A ``DistributedDataParallel``
    model keeps the gloo process group alive after it is gone (torch 2.13), so gloo's worker threads
    outlive ``cleanup()``. When a worker still holds a finished collective with a Python tensor while
    the interpreter shuts down, dropping it takes the GIL. That aborts the process
    ("terminate called without an active exception", SIGABRT), at random, after all the work is done.
    Leaving with ``os._exit`` skips that teardown. Outside a process group this is ``sys.exit(code)``.
    """
    if not _ran_collectives[0]:
        sys.exit(code)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed or broken pipe: nothing more can reach it
            pass
    os._exit(code)
