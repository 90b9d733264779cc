"""Helpers for data- and tensor-parallel training under ``torchrun``: initialise, wrap, write from rank 0.

Typical use (what ``blockopt bench --parallel fsdp|ddp|tp|fsdp+tp`` does)::

    ctx = init_distributed()                      # reads RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT
    model = build_model(...).to(ctx.device)       # the same initial weights on every rank (same seed)
    model = wrap_model(model, "fsdp")             # or "ddp", "tp", "fsdp+tp"
    opt = blockopt.AdamMini(unwrap(model), ...)   # after wrapping: FSDP2 replaces parameters by DTensors
    for step, x in enumerate(batches):            # each rank takes its share: shard_batch(x, ctx, "fsdp")
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
    "data_parallel",
    "exit_process",
    "grad_norm",
    "init_distributed",
    "is_main_process",
    "shard_batch",
    "tensor_parallel",
    "torchrun_env",
    "unwrap",
    "wrap_model",
    "write_on_rank0",
]

PARALLEL_CHOICES = ("fsdp", "ddp", "tp", "fsdp+tp")
#: the tensor-parallel degree of ``"fsdp+tp"`` (the rest of the world is FSDP2's data-parallel dimension)
TP_DEGREE = 2
#: linear layers split by output (``ColwiseParallel``) and by input (``RowwiseParallel``), by the last part
#: of their name: the built-in models', Hugging Face Llama / Qwen and torchtitan names
COLWISE = frozenset({"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "fc", "wq", "wk", "wv", "w1", "w3"})
ROWWISE = frozenset({"o_proj", "down_proj", "proj", "wo", "w2", "out_proj"})
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


def tensor_parallel(model: nn.Module, tp_mesh: Any) -> nn.Module:
    """torchtitan's plan on the linear layers of the repeated blocks, in place: ``ColwiseParallel`` on
    q/k/v/gate/up (:data:`COLWISE`), ``RowwiseParallel`` on o/down (:data:`ROWWISE`); embeddings, norms
    and the output head stay whole on every rank. Each split layer's features must divide by the
    tensor-parallel degree (``ValueError`` naming the layer otherwise). The model's attention must take
    its head count from the projections' widths, as the built-in models do."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    tp = tp_mesh.size()
    for block in _shard_roots(model):
        plan: dict[str, Any] = {}
        for name, m in block.named_modules():
            last = name.rsplit(".", 1)[-1]
            if not isinstance(m, nn.Linear) or last not in COLWISE | ROWWISE:
                continue
            n = m.out_features if last in COLWISE else m.in_features
            if n % tp:
                raise ValueError(f"Invalid tensor-parallel degree {tp} for {type(m).__name__} {name!r}: its "
                                 f"{'out' if last in COLWISE else 'in'}_features {n} does not divide by it")
            plan[name] = ColwiseParallel() if last in COLWISE else RowwiseParallel()
        if plan:
            parallelize_module(block, tp_mesh, plan)
    return model


def wrap_model(model: nn.Module, parallel: str, *, offload: bool = False, mixed_precision: Any = None,
               device: torch.device | None = None) -> nn.Module:
    """Make ``model`` data parallel and/or tensor parallel; build the optimizer *after* this.

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

    ``"tp"``: tensor parallel over all ranks (:func:`tensor_parallel`); every rank
    sees the whole batch. ``"fsdp+tp"``: a 2-D mesh, :data:`TP_DEGREE` ranks of
    tensor parallel times the rest of FSDP2 (``dp``); see :func:`data_parallel`.
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
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

    dev_type = (device or next(model.parameters()).device).type
    world = dist.get_world_size()
    if parallel == "tp":
        if offload or mixed_precision is not None:
            raise ValueError("Invalid options for parallel='tp': offload and mixed_precision are FSDP2 options")
        return tensor_parallel(model, init_device_mesh(dev_type, (world,), mesh_dim_names=("tp",)))
    kwargs: dict[str, Any] = {}
    if parallel == "fsdp+tp":
        if world % TP_DEGREE:
            raise ValueError(f"Invalid world size {world} for parallel='fsdp+tp': it must divide by the "
                             f"tensor-parallel degree {TP_DEGREE}")
        mesh = init_device_mesh(dev_type, (world // TP_DEGREE, TP_DEGREE), mesh_dim_names=("dp", "tp"))
        tensor_parallel(model, mesh["tp"])
        kwargs["mesh"] = mesh["dp"]
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


@torch.no_grad()
def grad_norm(params: list[torch.Tensor], max_norm: float = 0.0) -> torch.Tensor:
    """The global 2-norm of the gradients of ``params``, plain tensors and DTensors on any meshes mixed
    (what ``torch.nn.utils.clip_grad_norm_`` refuses under tensor parallel, where the embeddings stay
    plain); with ``max_norm > 0`` the gradients are scaled as ``clip_grad_norm_`` does. A DTensor's norm
    is completed over its mesh: one collective per DTensor gradient."""
    total = torch.zeros((), dtype=torch.float64)
    grads = [p.grad for p in params if p.grad is not None]
    for g in grads:
        n = torch.linalg.vector_norm(g, 2)
        if hasattr(n, "full_tensor"):
            n = n.full_tensor()
        total += n.double().cpu() ** 2
    norm = total.sqrt().float()
    if max_norm > 0:
        coef = float(max_norm) / (float(norm) + 1e-6)
        if coef < 1.0:
            for g in grads:
                g.mul_(coef)
    return norm


def data_parallel(ctx: DistContext, parallel: str = "fsdp") -> tuple[int, int]:
    """(this rank's data-parallel rank, the data-parallel size) under ``parallel``: tensor-parallel
    ranks share their batch (``"tp"``: one data-parallel rank; ``"fsdp+tp"``: rank // TP_DEGREE of
    world // TP_DEGREE, the mesh being row-major)."""
    if parallel == "tp":
        return 0, 1
    if parallel == "fsdp+tp":
        return ctx.rank // TP_DEGREE, ctx.world_size // TP_DEGREE
    return ctx.rank, ctx.world_size


def shard_batch(x: torch.Tensor, ctx: DistContext, parallel: str = "fsdp") -> torch.Tensor:
    """This rank's contiguous share of a global batch (dim 0 must divide by the data-parallel size)."""
    rank, size = data_parallel(ctx, parallel)
    if x.shape[0] % size:
        raise ValueError(f"Invalid batch size {x.shape[0]}: it must divide by the data-parallel size {size}")
    per = x.shape[0] // size
    return x[rank * per:(rank + 1) * per]


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
