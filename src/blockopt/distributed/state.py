"""Optimizer state of sharded parameters, in the form checkpoints keep.

During training a rank keeps the second moments of the blocks it touches
(``ShardLayout.blocks``). Checkpoints hold the *full* vector, the same plain
tensor on every rank: ``torch.distributed.checkpoint`` then writes it once
(replicated tensors are de-duplicated) and any world size can load it, each
rank slicing its own range back (:func:`local_block_state`). ``exp_avg`` stays
a DTensor laid out like the parameter, which DCP reshards itself.

:func:`gather_block_states` assembles the full vectors of all sharded
parameters with one ``all_reduce`` per process group: each block is written by
exactly one rank (its owner), every other rank adds zeros, so the sum is exact.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .boxes import BoxInfo, gather_box_states, local_box_state
from .comm import comm_device
from .dtensor import is_dtensor
from .sharding import ShardInfo, chunk_rows

__all__ = ["as_dtensor", "gather_block_states", "local_block_state", "local_exp_avg"]


def gather_block_states(vs: Sequence[torch.Tensor], infos: Sequence[ShardInfo | BoxInfo]) -> list[torch.Tensor]:
    """Full second-moment vectors (plain tensors, identical on every rank) from the local ranges.

    Collective: every rank must call it with the same parameters in the same order.
    """
    import torch.distributed as dist

    out: list[torch.Tensor | None] = [None] * len(vs)
    box = [i for i, info in enumerate(infos) if isinstance(info, BoxInfo)]
    if box:
        for i, full in zip(box, gather_box_states([vs[i] for i in box], [infos[i] for i in box])):  # type: ignore[misc]
            out[i] = full
    rest = [i for i in range(len(infos)) if i not in set(box)]  # FSDP2's row shards
    vs, infos = [vs[i] for i in rest], [infos[i] for i in rest]
    by_group: dict[object, list[int]] = {}
    for i, info in enumerate(infos):
        by_group.setdefault(info.group, []).append(i)
    for group, idx in by_group.items():
        sizes = [infos[i].layout.geometry.num_blocks for i in idx]
        dtype = vs[idx[0]].dtype
        for i in idx:
            dtype = torch.promote_types(dtype, vs[i].dtype)
        device = vs[idx[0]].device
        buf = torch.zeros(sum(sizes), dtype=dtype, device=comm_device(group, device))
        off = 0
        offsets = []
        for i, n in zip(idx, sizes):
            offsets.append(off)
            lo = infos[i].layout.blocks[0]
            a, b = infos[i].layout.owned
            if a < b:
                buf[off + a:off + b].copy_(vs[i][a - lo:b - lo])
            off += n
        dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group)
        for i, off, n in zip(idx, offsets, sizes):
            out[rest[i]] = buf[off:off + n].to(vs[i].device, vs[i].dtype, copy=True)
    return out  # type: ignore[return-value]


def local_block_state(full: torch.Tensor, info: ShardInfo | BoxInfo) -> torch.Tensor:
    """This rank's range of a full second-moment vector (a copy)."""
    if isinstance(info, BoxInfo):
        return local_box_state(full, info)
    lo, hi = info.layout.blocks
    return full.detach()[lo:hi].clone()


def local_exp_avg(saved: torch.Tensor, p: torch.Tensor, shape: tuple[int, int] | None = None) -> torch.Tensor:
    """``exp_avg`` for DTensor parameter ``p`` from a saved one: a DTensor laid out like ``p``.

    A saved DTensor is redistributed to ``p``'s placements when they differ; a
    plain tensor of the global shape (e.g. a single-process checkpoint) is
    sliced to this rank's rows. ``shape``: the global 2-D shape of a per-row
    tensor other than ``p``'s (int8 momentum's ``exp_avg_scale``: one row per row of ``p``).
    """

    if is_dtensor(saved):
        t = saved.detach()
        if t.device_mesh != p.device_mesh:
            raise ValueError(
                f"exp_avg was saved on device mesh {t.device_mesh}, the parameter lives on {p.device_mesh}; "
                "load through torch.distributed.checkpoint (get/set_optimizer_state_dict) to reshard"
            )
        if tuple(t.placements) != tuple(p.placements):
            t = t.redistribute(p.device_mesh, p.placements)
        return t.clone()
    from torch.distributed.tensor import Shard  # p is a DTensor: the module is loaded

    local = saved.detach()
    mesh = p.device_mesh
    if mesh.ndim == 1 and tuple(p.placements) == (Shard(0),):  # FSDP2: validated when the optimizer was built
        r0, r1 = chunk_rows(p.shape[0], mesh.size(0), mesh.get_local_rank(0))
        local = local[r0:r1]
    elif any(isinstance(pl, Shard) or type(pl).__name__ == "_StridedShard" for pl in p.placements):  # a TP box
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        full_shape = tuple(shape) if shape is not None else tuple(p.shape)
        sizes, offset = compute_local_shape_and_global_offset(full_shape, mesh, p.placements)
        local = local[tuple(slice(o, o + n) for o, n in zip(offset, sizes))]
    local = local.to(p.to_local().device).clone(memory_format=torch.contiguous_format)
    return as_dtensor(local, p, shape)


def as_dtensor(local: torch.Tensor, p: torch.Tensor, shape: tuple[int, int] | None = None) -> torch.Tensor:
    """A local state tensor as a DTensor laid out like DTensor parameter ``p`` (no copy, no check);
    ``shape``: the global 2-D shape of a per-row tensor other than ``p``'s (see :func:`local_exp_avg`)."""
    from torch.distributed.tensor import DTensor

    if shape is None:
        return DTensor.from_local(local, p.device_mesh, p.placements, run_check=False, shape=p.shape,
                                  stride=p.stride())
    return DTensor.from_local(local, p.device_mesh, p.placements, run_check=False, shape=shape,
                              stride=(shape[1], 1))
