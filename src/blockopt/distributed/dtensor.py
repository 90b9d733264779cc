"""DTensor parameters: which placements Adam-mini supports, and each parameter's :class:`ShardInfo`.

Supported: a DTensor on a 1-D device mesh with placement ``Shard(0)`` (what
FSDP2's ``fully_shard`` produces by default, uneven ``torch.chunk``-style
shards included) or ``Replicate()``. Anything else (``Shard(1)`` from a
``shard_placement_fn``, the strided shards of FSDP2 + tensor parallel, a
``Partial`` placement, a 2-D mesh as in HSDP) raises ``ValueError`` naming the
parameter and the placement: Adam-mini's blocks would need another layout.
The process group is the mesh's (``device_mesh.get_group(0)``); nothing reads
device counts.
"""

from __future__ import annotations

import sys
from typing import Any

import torch

from ..kernels.blocks import Geometry
from .sharding import ShardInfo, chunk_rows, shard_layout

__all__ = ["check_grad", "is_dtensor", "local_tensor", "make_shard_info", "require_initialized"]

try:  # torch built without distributed support (some macOS / Windows wheels)
    import torch.distributed as dist
except ImportError:  # pragma: no cover - depends on the torch build
    dist = None  # type: ignore[assignment]


def is_dtensor(t: Any) -> bool:
    """Whether ``t`` is a DTensor. ``torch.distributed.tensor`` is not imported here (it takes about half a
    second, with Dynamo more): a DTensor can only exist once something else has imported it."""
    module = sys.modules.get("torch.distributed.tensor")
    cls = getattr(module, "DTensor", None) if module is not None else None
    return cls is not None and isinstance(t, cls)


def require_initialized(what: str) -> None:
    """Raise ``RuntimeError`` unless the default process group exists."""
    if dist is None or not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            f"{what} is a DTensor (sharded or replicated by FSDP2 / DTensor), but torch.distributed is not "
            "initialised in this process: call torch.distributed.init_process_group() (torchrun sets the "
            "environment; see blockopt.distributed.launch.init_distributed) before building and stepping "
            "AdamMini, and do not destroy the process group while the optimizer is in use"
        )


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (a view: in-place writes reach the DTensor); plain tensors unchanged."""
    return t.to_local() if is_dtensor(t) else t


def make_shard_info(p: torch.Tensor, geometry: Geometry, name: str) -> ShardInfo | None:
    """Check ``p``'s placement; its :class:`ShardInfo` for ``Shard(0)`` (on the local device), ``None`` for
    ``Replicate()``."""
    from torch.distributed.tensor import Replicate, Shard  # p is a DTensor: the module is loaded

    require_initialized(f"parameter {name!r}")
    mesh = p.device_mesh
    placements = tuple(p.placements)
    if mesh.ndim != 1 or len(placements) != 1:
        raise ValueError(
            f"Invalid placement of parameter {name!r}: {placements} on a {mesh.ndim}-D device mesh; AdamMini "
            "supports DTensors on a 1-D mesh with placement Shard(0) (FSDP2's default) or Replicate()"
        )
    (placement,) = placements
    local = p.to_local()
    shape = tuple(p.shape)
    if type(placement) is Replicate:
        return None  # every rank holds the whole tensor: the ordinary kernels run on the local tensors
    if type(placement) is not Shard or placement.dim != 0 or not shape:
        raise ValueError(
            f"Invalid placement of parameter {name!r}: {placement!r}; AdamMini supports Shard(0) (FSDP2's "
            "default, rows split across ranks) and Replicate() -- e.g. do not pass a shard_placement_fn to "
            "fully_shard that shards another dimension"
        )
    world = mesh.size(0)
    rank = mesh.get_local_rank(0)
    expected = chunk_rows(shape[0], world, rank)
    if tuple(local.shape) != (expected[1] - expected[0], *shape[1:]):
        raise ValueError(
            f"Invalid sharding of parameter {name!r}: rank {rank} of {world} holds a local shard of shape "
            f"{list(local.shape)}, but Shard(0) with torch.chunk semantics gives rows {list(expected)} of "
            f"{list(shape)}"
        )
    if not local.is_contiguous():
        raise ValueError(f"Invalid sharding of parameter {name!r}: its local shard is not contiguous")
    return ShardInfo(shard_layout(shape, geometry, rank, world), local.device, group=mesh.get_group(0))


def check_grad(p: torch.Tensor, name: str) -> torch.Tensor:
    """The local gradient of a DTensor parameter, after checking its placement matches."""
    g = p.grad
    if is_dtensor(g):
        if tuple(g.placements) != tuple(p.placements):
            raise RuntimeError(
                f"the gradient of {name!r} has placements {tuple(g.placements)} but the parameter has "
                f"{tuple(p.placements)}; AdamMini needs reduced gradients laid out like the parameter"
            )
        return g.to_local()
    local = p.to_local()
    if tuple(g.shape) != tuple(local.shape):
        raise RuntimeError(
            f"the gradient of DTensor parameter {name!r} is a plain tensor of shape {list(g.shape)}; expected a "
            f"DTensor, or the local shard shape {list(local.shape)}"
        )
    return g
