"""DTensor parameters: which placements Adam-mini supports, and each parameter's layout.

Supported: every placement torch's FSDP2 and tensor-parallel styles produce,
on 1-D and 2-D device meshes:

* ``Shard(0)`` alone on a 1-D mesh (FSDP2's default, uneven ``torch.chunk``-style
  shards included): a :class:`ShardInfo` (rows; only blocks that cross a shard
  boundary are reduced);
* ``Replicate()`` on every mesh dimension: ``None`` (the ordinary step on the
  local tensors);
* anything else made of ``Shard(d)``, torch's strided shards (FSDP2 over TP) and
  ``Replicate()``: a :class:`~blockopt.distributed.boxes.BoxInfo` (the local tensor
  is a box of the global one; the block sums are reduced over each mesh
  dimension that shards the parameter).

``Partial()`` parameters raise ``ValueError`` naming the parameter and the
placement. The process groups are the mesh's (``device_mesh.get_group(dim)``);
nothing reads device counts.
"""

from __future__ import annotations

import math
import sys
from typing import Any

import torch

from ..kernels.blocks import Geometry
from .boxes import BoxInfo, box_layout
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


def make_shard_info(p: torch.Tensor, geometry: Geometry, name: str, *, momentum: str = "fp32",
                    calibrate: bool = False) -> ShardInfo | BoxInfo | None:
    """Check ``p``'s placement; its :class:`ShardInfo` for ``Shard(0)`` on a 1-D mesh, a
    :class:`~blockopt.distributed.boxes.BoxInfo` for tensor-parallel and 2-D layouts, ``None`` for
    ``Replicate()`` everywhere. ``momentum``: the optimizer's momentum format (int8 needs column
    splits on its 256-column groups); ``calibrate``: an in-run calibration (FSDP2's layout only)."""
    from torch.distributed.tensor import Replicate, Shard  # p is a DTensor: the module is loaded

    require_initialized(f"parameter {name!r}")
    mesh = p.device_mesh
    placements = tuple(p.placements)
    local = p.to_local()
    shape = tuple(p.shape)
    if all(type(pl) is Replicate for pl in placements):
        return None  # every rank holds the whole tensor: the ordinary kernels run on the local tensors
    bad = [pl for pl in placements if not (_is_shard(pl) or type(pl) is Replicate)]
    if bad or not shape:
        raise ValueError(
            f"Invalid placement of parameter {name!r}: {placements}; AdamMini supports Shard(d) (FSDP2, "
            "ColwiseParallel, RowwiseParallel, and torch's strided shards of FSDP2 over tensor parallel) and "
            "Replicate() on each mesh dimension, not Partial() or other placements"
        )
    if not local.is_contiguous():
        raise ValueError(f"Invalid sharding of parameter {name!r}: its local shard is not contiguous")
    if mesh.ndim == 1 and type(placements[0]) is Shard and placements[0].dim == 0:
        world = mesh.size(0)
        rank = mesh.get_local_rank(0)
        expected = chunk_rows(shape[0], world, rank)
        if tuple(local.shape) != (expected[1] - expected[0], *shape[1:]):
            raise ValueError(
                f"Invalid sharding of parameter {name!r}: rank {rank} of {world} holds a local shard of shape "
                f"{list(local.shape)}, but Shard(0) with torch.chunk semantics gives rows {list(expected)} of "
                f"{list(shape)}"
            )
        return ShardInfo(shard_layout(shape, geometry, rank, world), local.device, group=mesh.get_group(0))
    return _box_info(p, geometry, name, momentum, calibrate)


def _is_shard(placement: Any) -> bool:
    """``Shard(d)``, or torch's ``_StridedShard`` (FSDP2 over tensor parallel; not a ``Shard`` subclass in
    every torch release)."""
    from torch.distributed.tensor import Shard

    return isinstance(placement, Shard) or type(placement).__name__ == "_StridedShard"


def _box_info(p: torch.Tensor, geometry: Geometry, name: str, momentum: str, calibrate: bool) -> BoxInfo:
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    from ..kernels.momentum import GROUP, format_for

    mesh, placements, shape = p.device_mesh, tuple(p.placements), tuple(p.shape)
    local_shape, offset = compute_local_shape_and_global_offset(shape, mesh, placements)
    if tuple(local_shape) != tuple(p.to_local().shape):
        raise ValueError(f"Invalid sharding of parameter {name!r}: its local shard has shape "
                         f"{list(p.to_local().shape)}, but placements {placements} give {list(local_shape)}")
    box = tuple((o, o + n) for o, n in zip(offset, local_shape))
    if calibrate:
        raise ValueError(f"Invalid calibrate with parameter {name!r} placed {placements} on a {mesh.ndim}-D mesh: "
                         "the in-run SNR calibration supports FSDP2's Shard(0) on a 1-D mesh only; calibrate first "
                         "(blockopt.calibrate) and pass plan=, or train without calibrate=")
    if format_for(momentum, shape) == "int8" and len(shape) >= 2:
        rest = shape[2:]
        cols = shape[1] * math.prod(rest)
        c0, c1 = box[1][0] * math.prod(rest), box[1][1] * math.prod(rest)
        whole_rest = all(b == (0, n) for b, n in zip(box[2:], rest))
        if not whole_rest or (c0 % GROUP) or (c1 % GROUP and c1 != cols):
            raise ValueError(
                f"Invalid momentum_dtype='int8' for parameter {name!r} placed {placements}: this rank holds "
                f"columns [{c0}, {c1}) of {cols}, which cut int8 momentum's groups of {GROUP} columns (each group "
                f"shares one scale); int8 needs column splits on multiples of {GROUP}. Use "
                "momentum_dtype=torch.bfloat16, or a tensor-parallel degree that splits the columns so")
    groups = [mesh.get_group(dim) for dim, pl in enumerate(placements) if _is_shard(pl) and mesh.size(dim) > 1]
    return BoxInfo(box_layout(shape, geometry, box, name), p.to_local().device, groups)


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


def reduce_partial_grads(params: list[torch.Tensor]) -> int:
    """Sum (or average) gradients left ``Partial`` over their mesh dimensions, in place: what
    ``SequenceParallel`` leaves on the norms' ``Replicate()`` weights (each rank saw part of the
    sequence). One ``all_reduce`` per process group for all such gradients; each becomes a DTensor
    laid out like its parameter. Returns the collectives issued."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, Partial

    todo: dict[object, list[tuple[torch.Tensor, int, str]]] = {}
    for p in params:
        g = p.grad
        if not is_dtensor(g):
            continue
        for dim, pl in enumerate(g.placements):
            if isinstance(pl, Partial):
                if pl.reduce_op not in ("sum", "avg"):
                    raise ValueError(f"Invalid gradient placement {pl!r} of a parameter placed {tuple(p.placements)}: "
                                     "AdamMini reduces Partial('sum') and Partial('avg') gradients only")
                todo.setdefault(g.device_mesh.get_group(dim), []).append((p, dim, pl.reduce_op))
    for group, items in todo.items():
        locals_ = [p.grad.to_local() for p, _, _ in items]
        buf = torch.cat([t.reshape(-1) for t in locals_])
        dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group)
        off = 0
        for (p, dim, op), t in zip(items, locals_):
            n = t.numel()
            part = buf[off:off + n].view_as(t)
            if op == "avg":
                part = part / dist.get_world_size(group)
            off += n
            placements = list(p.grad.placements)
            placements[dim] = p.placements[dim]
            p.grad = DTensor.from_local(part.clone(), p.grad.device_mesh, placements, run_check=False,
                                        shape=p.grad.shape, stride=p.grad.stride())
    return len(todo)
