"""Tensor-parallel and 2-D layouts: a rank holds a box of the parameter, and the blocks it touches.

FSDP2 alone shards dim 0 on a 1-D mesh (:mod:`blockopt.distributed.sharding`).
Tensor parallelism shards other dimensions too, alone or with FSDP2 on a 2-D
mesh: ``ColwiseParallel`` gives ``Shard(0)``, ``RowwiseParallel`` ``Shard(1)``,
``SequenceParallel`` ``Replicate()``, and FSDP2 over TP adds a (strided) shard of
dim 0 on the data-parallel mesh dimension. In every case the local tensor is a
*box* of the global one: a range ``[start, stop)`` along each dimension.

The blocks never change with the layout: the plan decides them on the global
shape. A rank touches the blocks its box meets along the geometry's coordinate
(rows for ``axis=0``, columns for ``axis=1``, (slice, column) pairs for
``axis=2``), every element for per-element blocks, block 0 for a whole-tensor
block. Its partial sums of ``g**2`` are scattered into the parameter's *full*
block vector (zeros elsewhere), and that vector is summed over each mesh
dimension that shards the parameter, one mesh dimension after the other. The
boxes partition the tensor, so the result is the global sum on every rank;
mesh dimensions where the parameter is replicated are left out. One
``all_reduce`` per mesh dimension per step carries every parameter sharded on
it, in the same collective as FSDP2's boundary blocks on that group
(:func:`box_vectors`, :func:`blockopt.distributed.step.reduce_all`).

The second moments a rank keeps are those of the blocks it touches (the same
values on every rank that touches a block, since every rank holds the same
reduced sums). Checkpoints hold the full vector (:func:`gather_box_states`,
a ``MAX`` over the same mesh dimensions: the values are non-negative, and a rank
that does not touch a block contributes zero).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..kernels.blocks import Geometry, block_of, coordinate_block_ids, is_elementwise
from .comm import comm_device

__all__ = ["BoxInfo", "BoxLayout", "box_layout", "box_results", "box_vectors", "gather_box_states", "global_flat_index"]

Range = tuple[int, int]


@dataclass(frozen=True)
class BoxLayout:
    """One rank's box of a parameter and the plan's blocks it touches.

    Attributes:
        shape: global shape. geometry: the plan's blocks.
        box: ``[start, stop)`` of the local tensor along every dimension (global indices).
        blocks: global ids ``[lo, hi)`` of the blocks this rank touches; ``None`` for per-element
            blocks (then every local element is one, see :attr:`BoxInfo.gids`).
    """

    shape: tuple[int, ...]
    geometry: Geometry
    box: tuple[Range, ...]
    blocks: Range | None  # [lo, hi) when the touched blocks are a range (all but a per-element box)

    @property
    def local_shape(self) -> tuple[int, ...]:
        return tuple(b - a for a, b in self.box)

    @property
    def rows(self) -> Range:
        return self.box[0]

    @property
    def num_local_blocks(self) -> int:
        if self.blocks is not None:
            return self.blocks[1] - self.blocks[0]
        return math.prod(self.local_shape)

    def is_slab(self) -> bool:
        """Whether the box is whole along every dimension but the first."""
        return all(b == (0, n) for b, n in zip(self.box[1:], self.shape[1:]))


def global_flat_index(box: Sequence[Range], shape: Sequence[int], device: torch.device | str = "cpu") -> torch.Tensor:
    """The flat index in the global tensor of every element of the local box (int64, the box's shape)."""
    idx = torch.zeros((), dtype=torch.int64, device=device)
    stride = 1
    for d in range(len(shape) - 1, -1, -1):
        a, b = box[d]
        r = torch.arange(a, b, dtype=torch.int64, device=device) * stride
        idx = r.view((-1,) + (1,) * (len(shape) - 1 - d)) + idx
        stride *= shape[d]
    return idx.reshape([b - a for a, b in box])


def box_layout(shape: tuple[int, ...], geometry: Geometry, box: tuple[Range, ...], name: str) -> BoxLayout:
    """The :class:`BoxLayout` of a box; ``ValueError`` (naming ``name``) for a geometry the box cannot take."""
    geometry = Geometry(*geometry)
    axis, segments = geometry
    layout = BoxLayout(tuple(shape), geometry, tuple(box), None)
    empty = any(a >= b for a, b in box) or not shape
    if is_elementwise(geometry):
        return layout  # every local element is its own block
    if empty:
        return BoxLayout(layout.shape, geometry, layout.box, (0, 0))
    if axis in (0, 1):
        a, b = box[axis]
        return BoxLayout(layout.shape, geometry, layout.box, (block_of(geometry, a), block_of(geometry, b - 1) + 1))
    if axis == 2:
        if not (box[1] == (0, shape[1]) and box[2] == (0, shape[2])):
            raise ValueError(f"Invalid placement of parameter {name!r}: its blocks are (expert, column) pairs of a "
                             f"stacked [E, in, out] tensor; AdamMini supports sharding such a tensor along dim 0 "
                             f"only, and this rank holds {[list(r) for r in box]} of {list(shape)}")
        cols = shape[2]
        s0, s1 = box[0]
        return BoxLayout(layout.shape, geometry, layout.box,
                         (block_of(geometry, s0 * cols), block_of(geometry, s1 * cols - 1) + 1))
    if geometry.num_blocks == 1:
        return BoxLayout(layout.shape, geometry, layout.box, (0, 1))
    raise ValueError(f"Invalid placement of parameter {name!r}: its blocks are runs of {segments[0][1]} flat elements, "
                     f"which a box {[list(r) for r in box]} of {list(shape)} cuts across rows; AdamMini supports such "
                     "blocks only under FSDP2's Shard(0) on a 1-D mesh (or per-row / per-column / whole-tensor blocks)")


class BoxInfo:
    """A :class:`BoxLayout` with the index tensors of the step, and the process groups of the mesh
    dimensions that shard the parameter (``groups``, in mesh order; the same order on every rank)."""

    def __init__(self, layout: BoxLayout, device: torch.device | str, groups: Sequence[object]) -> None:
        self.layout = layout
        self.groups = tuple(groups)
        axis = layout.geometry.axis
        lo = layout.blocks[0] if layout.blocks is not None else 0
        self.empty = any(a >= b for a, b in layout.box)
        if layout.blocks is None:
            self.gids = global_flat_index(layout.box, layout.shape, device).reshape(-1)
            self.ids = torch.zeros(0, dtype=torch.int64, device=device)
        elif self.empty:  # a rank with no part of this tensor (uneven chunks)
            self.gids = torch.zeros(0, dtype=torch.int64, device=device)
            self.ids = torch.zeros(0, dtype=torch.int64, device=device)
        else:
            self.gids = torch.arange(*layout.blocks, dtype=torch.int64, device=device)
            if axis in (0, 1):
                a, b = layout.box[axis]
                self.ids = (coordinate_block_ids(layout.geometry, a, b) - lo).to(device)
            elif axis == 2:
                cols = layout.shape[2]
                s0, s1 = layout.box[0]
                self.ids = (coordinate_block_ids(layout.geometry, s0 * cols, s1 * cols) - lo).to(device)
            else:
                self.ids = torch.zeros(0, dtype=torch.int64, device=device)
        self.counts = torch.tensor(self._counts(), dtype=torch.float64, device=device)

    def _counts(self) -> list[int]:
        layout = self.layout
        shape, (axis, segments) = layout.shape, layout.geometry
        if layout.blocks is None:
            return [1] * layout.num_local_blocks
        lo, hi = layout.blocks
        if axis == -1:
            return [math.prod(shape)] * (hi - lo)
        other = shape[1] if axis == 2 else (math.prod(shape) // shape[axis] if shape[axis] else 0)
        counts, first = [], 0
        for size, unit in segments:
            nb = size // unit
            counts += [unit * other] * max(0, min(hi, first + nb) - max(lo, first))
            first += nb
        return counts

    @property
    def num_blocks(self) -> int:
        return self.layout.geometry.num_blocks if self.layout.blocks is not None else math.prod(self.layout.shape)

    @property
    def local_shape(self) -> tuple[int, ...]:
        return self.layout.local_shape

    def flat_index(self, device: torch.device | str) -> torch.Tensor:
        """Every local element's index in the global tensor (int8 momentum's random bits)."""
        return global_flat_index(self.layout.box, self.layout.shape, device)

    def local_sums(self, g: torch.Tensor) -> torch.Tensor | None:
        """Sums of ``g**2`` over the local part of each local block (``None`` for per-element blocks)."""
        layout = self.layout
        axis = layout.geometry.axis
        if layout.blocks is None:
            return None
        out = torch.zeros(layout.num_local_blocks, dtype=g.dtype, device=g.device)
        if out.numel() == 0 or g.numel() == 0:
            return out
        if axis == 0:
            return out.index_add_(0, self.ids, torch.linalg.vector_norm(g.reshape(g.shape[0], -1), 2, dim=1).square_())
        if axis == 1:
            dims = (0,) + tuple(range(2, g.dim()))
            return out.index_add_(0, self.ids, torch.linalg.vector_norm(g, 2, dim=dims).square_())
        if axis == 2:
            return out.index_add_(0, self.ids, torch.linalg.vector_norm(g, 2, dim=1).square_().reshape(-1))
        return torch.linalg.vector_norm(g).square().reshape(1)

    def expand(self, denom: torch.Tensor) -> torch.Tensor:
        """The per-block denominator broadcastable to the local box."""
        shape = self.local_shape
        axis = self.layout.geometry.axis
        if self.empty:
            return denom.new_empty(shape)
        if self.layout.blocks is None:
            return denom.view(shape)
        if axis == 0:
            return denom[self.ids].view((shape[0],) + (1,) * (len(shape) - 1))
        if axis == 1:
            return denom[self.ids].view((1, shape[1]) + (1,) * (len(shape) - 2))
        if axis == 2:
            return denom[self.ids].view(shape[0], 1, shape[2])
        return denom.view((1,) * len(shape))

    def __repr__(self) -> str:
        return f"BoxInfo({self.layout}, reduced over {len(self.groups)} mesh dimension(s))"


def _staged(fulls: list[torch.Tensor], infos: Sequence[BoxInfo], op: str) -> int:
    """All-reduce every full vector over each mesh dimension of its info, one collective per mesh
    dimension (in first-seen order, the same on every rank). Returns the collectives issued."""
    import torch.distributed as dist

    stages: dict[object, tuple[object, list[int]]] = {}  # process group -> (group, parameters)
    for i, info in enumerate(infos):
        for group in info.groups:
            stages.setdefault(group, (group, []))[1].append(i)
    rop = dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX
    for group, idx in stages.values():
        dtype = torch.float32
        for i in idx:
            dtype = torch.promote_types(dtype, fulls[i].dtype)
        buf = torch.cat([fulls[i].to(dtype) for i in idx]).to(comm_device(group, fulls[idx[0]].device))
        dist.all_reduce(buf, op=rop, group=group)
        off = 0
        for i in idx:
            n = fulls[i].numel()
            fulls[i] = buf[off:off + n].to(fulls[i].device, fulls[i].dtype)
            off += n
    return len(stages)


def box_vectors(sums: Sequence[torch.Tensor | None], infos: Sequence[BoxInfo]
                ) -> tuple[list[int], list[torch.Tensor], dict[object, list[torch.Tensor]]]:
    """Phase 2 of the step for box layouts, first half: each parameter's full block vector (its local
    sums in place, zeros elsewhere) and, per process group, the vectors to sum over it. ``infos`` lists
    every box-layout parameter in the same order on every rank (``None`` sums: no gradient here, or
    per-element blocks). Returns (indices of the parameters reduced, their vectors, the stages)."""
    todo = [i for i, info in enumerate(infos) if info.layout.blocks is not None and info.groups]
    fulls = []
    for i in todo:
        info, s = infos[i], sums[i]
        full = torch.zeros(info.num_blocks, dtype=s.dtype if s is not None else torch.float32, device=info.gids.device)
        if s is not None and s.numel():
            full.index_copy_(0, info.gids, s)
        fulls.append(full)
    stages: dict[object, list[torch.Tensor]] = {}
    for i, full in zip(todo, fulls):
        for group in infos[i].groups:
            stages.setdefault(group, []).append(full)
    return todo, fulls, stages


def box_results(sums: Sequence[torch.Tensor | None], infos: Sequence[BoxInfo], todo: list[int],
                fulls: list[torch.Tensor]) -> None:
    """Second half: each local block sum from its reduced full vector, in place."""
    for i, full in zip(todo, fulls):
        if sums[i] is not None:
            sums[i].copy_(full[infos[i].gids])


def gather_box_states(vs: Sequence[torch.Tensor], infos: Sequence[BoxInfo]) -> list[torch.Tensor]:
    """Full second-moment vectors (identical on every rank) from each rank's touched blocks. Collective."""
    fulls = []
    for v, info in zip(vs, infos):
        full = torch.zeros(info.num_blocks, dtype=v.dtype, device=v.device)
        if v.numel():
            full.index_copy_(0, info.gids.to(v.device), v.reshape(-1))
        fulls.append(full)
    _staged(fulls, infos, "max")
    return fulls


def local_box_state(full: torch.Tensor, info: BoxInfo) -> torch.Tensor:
    """This rank's blocks of a full second-moment vector (a copy)."""
    return full.detach().reshape(-1)[info.gids.to(full.device)].clone()
