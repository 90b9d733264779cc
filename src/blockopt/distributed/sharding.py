"""Which second-moment blocks a rank holds when a parameter is sharded along dim 0.

FSDP2 (``fully_shard``) stores every parameter as a DTensor on a 1-D device
mesh with placement ``Shard(0)``: rank ``k`` of ``W`` holds rows
``[k*c, min((k+1)*c, n))`` of dim 0, ``c = ceil(n / W)`` (``torch.chunk``
semantics, so the last ranks may hold fewer rows or none). A block of the
partition plan may lie inside one rank's rows, or cross a shard boundary (a
head split between two ranks, a whole-tensor block, every column block of a
column-wise layout). This module works that out once per parameter, from the
global shape, the geometry and the rank alone, so every rank derives the same
answer without communicating:

* :func:`shard_layout` -- a :class:`ShardLayout` (plain data): the local rows,
  the global block ids the rank touches, the blocks touched by two ranks or
  more ("shared", the same tuple on every rank) and the blocks this rank
  writes when the full second-moment vector is assembled ("owned").
* :class:`ShardInfo` -- the layout plus the small index tensors the step needs
  (block of every local row or column, global element count of every local
  block, positions of the shared blocks in the reduction buffer); none of them
  is parameter-sized.
* :func:`local_block_sq_sums` and :func:`expand_denominator` -- the two
  geometry-dependent pieces of the sharded step, on plain local tensors.

The block coordinate is the dimension the geometry cuts: rows for ``axis=0``,
columns for ``axis=1`` (every column block then spans all ranks), (slice,
column) pairs for ``axis=2`` (stacked ``[S, in, out]``: a rank holds whole
slices, so no block is shared), the
flattened tensor for ``axis=-1`` (rank ``k`` holds the flat range
``[r0 * rest, r1 * rest)``, ``rest`` = elements per row).

Knows nothing of optimizers; uses only :mod:`blockopt.kernels.blocks` (whose
:func:`~blockopt.kernels.blocks.coordinate_block_ids` gives every block id here).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import pairwise

import torch

from ..kernels.blocks import Geometry, block_of, coordinate_block_ids

__all__ = [
    "ShardInfo",
    "ShardLayout",
    "chunk_rows",
    "expand_denominator",
    "local_block_sq_sums",
    "shard_layout",
]

Range = tuple[int, int]


def chunk_rows(n: int, world: int, rank: int) -> Range:
    """Rows ``[r0, r1)`` of dim 0 that ``torch.chunk(t, world)`` gives rank ``rank`` (possibly empty)."""
    if world <= 0 or not 0 <= rank < world:
        raise ValueError(f"Invalid rank {rank} for world size {world}")
    c = -(-n // world) if n else 0
    r0 = min(rank * c, n)
    return r0, min(r0 + c, n)


def _touched(shape: tuple[int, ...], geometry: Geometry, rows: Range) -> Range:
    """Global block ids ``[lo, hi)`` that a rank holding ``rows`` touches; ``(0, 0)`` if none."""
    r0, r1 = rows
    rest = math.prod(shape[1:])
    if r0 == r1 or rest == 0:
        return (0, 0)
    axis = geometry.axis
    if axis == 1:
        return (0, geometry.num_blocks)
    if axis == 2:  # stacked [S, in, out]: the coordinate is (slice, column); blocks stay in a slice
        cols = shape[2]
        return (block_of(geometry, r0 * cols), block_of(geometry, r1 * cols - 1) + 1)
    if axis == 0:
        return (block_of(geometry, r0), block_of(geometry, r1 - 1) + 1)
    ((_, unit),) = geometry.segments
    f0, f1 = r0 * rest, r1 * rest
    return (f0 // unit, (f1 - 1) // unit + 1)


def _merge(ranges: list[Range]) -> tuple[Range, ...]:
    out: list[list[int]] = []
    for a, b in sorted(r for r in ranges if r[0] < r[1]):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return tuple((a, b) for a, b in out)


@dataclass(frozen=True)
class ShardLayout:
    """Where one rank's part of a sharded parameter sits among the plan's blocks.

    Attributes:
        shape: global shape of the parameter.
        geometry: its blocks (see :mod:`blockopt.kernels.blocks`).
        rank, world: coordinate and size of the mesh dimension that shards dim 0.
        rows: local rows ``[r0, r1)`` of dim 0 (global indices).
        blocks: global block ids ``[lo, hi)`` this rank touches; the local
            second-moment vector has ``hi - lo`` entries, boundary blocks
            being held by every rank that touches them.
        shared: global block ids touched by two ranks or more, as sorted
            disjoint ranges; the same on every rank.
        owned: the global ids ``[a, b)`` of the blocks whose value this rank
            contributes when the full vector is assembled (each block has
            exactly one owner: the lowest rank that touches it).
    """

    shape: tuple[int, ...]
    geometry: Geometry
    rank: int
    world: int
    rows: Range
    blocks: Range
    shared: tuple[Range, ...]
    owned: Range

    @property
    def num_local_blocks(self) -> int:
        return self.blocks[1] - self.blocks[0]

    @property
    def num_shared(self) -> int:
        """Length of this parameter's slot in the reduction buffer."""
        return sum(b - a for a, b in self.shared)

    def shared_positions(self) -> tuple[list[int], list[int]]:
        """(local block indices, positions in this parameter's buffer slot) of the shared blocks it touches."""
        lo, hi = self.blocks
        local, pos = [], []
        offset = 0
        for a, b in self.shared:
            for gid in range(max(a, lo), min(b, hi)):
                local.append(gid - lo)
                pos.append(offset + gid - a)
            offset += b - a
        return local, pos


def shard_layout(shape: tuple[int, ...], geometry: Geometry, rank: int, world: int) -> ShardLayout:
    """The :class:`ShardLayout` of rank ``rank`` of ``world`` for a tensor sharded along dim 0.

    Pure arithmetic on the global shape: every rank computes every rank's rows,
    so the shared blocks (and the reduction buffer built from them) agree
    everywhere without communication.
    """
    shape = tuple(int(s) for s in shape)
    if not shape:
        raise ValueError("a 0-dim tensor cannot be sharded along dim 0")
    geometry = Geometry(*geometry)
    all_rows = [chunk_rows(shape[0], world, k) for k in range(world)]
    touched = [_touched(shape, geometry, r) for r in all_rows]
    nonempty = [t for t in touched if t[0] < t[1]]
    # Ranges are ordered along the coordinate (axis 0 / -1) or identical (axis 1): blocks touched
    # by two ranks are exactly those in the overlap of two consecutive non-empty ranges.
    shared = _merge([(max(a[0], b[0]), min(a[1], b[1])) for a, b in pairwise(nonempty)])
    lo, hi = touched[rank]
    below = max((t[1] for t in touched[:rank] if t[0] < t[1]), default=0)
    own_lo = min(max(lo, below), hi)
    return ShardLayout(shape, geometry, rank, world, all_rows[rank], (lo, hi), shared, (own_lo, hi))


def _local_counts(layout: ShardLayout) -> list[int]:
    """Global element count of each local block."""
    shape, (axis, segments) = layout.shape, layout.geometry
    lo, hi = layout.blocks
    if axis == -1:
        return [segments[0][1]] * (hi - lo)
    if axis == 2:
        other = shape[1]
    else:
        other = math.prod(shape) // shape[axis] if shape[axis] else 0
    counts = []
    first = 0
    for size, unit in segments:
        nb = size // unit
        n = max(0, min(hi, first + nb) - max(lo, first))
        counts += [unit * other] * n
        first += nb
    return counts


def _coordinate_block_ids(layout: ShardLayout) -> torch.Tensor:
    """Local block index of each local row (axis 0), of each column (axis 1) or of each local
    (slice, column) pair (axis 2), int64."""
    axis = layout.geometry.axis
    if axis == 2:
        a, b = layout.rows[0] * layout.shape[2], layout.rows[1] * layout.shape[2]
    else:
        a, b = layout.rows if axis == 0 else (0, layout.shape[1])
    return coordinate_block_ids(layout.geometry, a, b) - layout.blocks[0]


class ShardInfo:
    """A :class:`ShardLayout` with the index tensors of the sharded step, on one device.

    ``ids``: int64, local block index of every local row (``axis=0``) or of
    every column (``axis=1``), empty for ``axis=-1``; ``counts``: global number
    of elements of every local block (state dtype is applied by the caller);
    ``shared_local`` / ``shared_pos``: local block indices of the shared blocks
    this rank touches and their positions in the parameter's buffer slot.
    ``group`` is the process group of the mesh dimension that shards dim 0
    (``None`` in single-process tests of the math).
    """

    def __init__(self, layout: ShardLayout, device: torch.device | str = "cpu", *, group=None) -> None:
        self.layout = layout
        self.group = group
        axis = layout.geometry.axis
        ids = _coordinate_block_ids(layout) if axis != -1 else torch.zeros(0, dtype=torch.int64)
        self.ids = ids.to(device)
        self.counts = torch.tensor(_local_counts(layout), dtype=torch.float64, device=device)
        local, pos = layout.shared_positions()
        self.shared_local = torch.tensor(local, dtype=torch.int64, device=device)
        self.shared_pos = torch.tensor(pos, dtype=torch.int64, device=device)

    @property
    def num_shared(self) -> int:
        """Slots of the reduction buffer this parameter's shared blocks use."""
        return self.layout.num_shared

    @property
    def local_shape(self) -> tuple[int, ...]:
        r0, r1 = self.layout.rows
        return (r1 - r0, *self.layout.shape[1:])

    def __repr__(self) -> str:
        return f"ShardInfo({self.layout})"


def local_block_sq_sums(g: torch.Tensor, info: ShardInfo) -> torch.Tensor:
    """Sum of ``g**2`` over the local part of every local block (1-D, ``num_local_blocks``).

    ``g`` is the local gradient shard (plain tensor, compute dtype). Row or
    column norms are reduced first, then added into blocks by ``info.ids``; no
    parameter-sized temporary is made except for per-element blocks (there the
    sums are ``g**2`` itself).
    """
    layout = info.layout
    axis, segments = layout.geometry
    n_local = layout.num_local_blocks
    out = torch.zeros(n_local, dtype=g.dtype, device=g.device)
    if n_local == 0:
        return out
    if axis == 0:
        rows = g.reshape(g.shape[0], -1) if g.dim() != 1 else g.unsqueeze(1)
        row_sq = torch.linalg.vector_norm(rows, 2, dim=1).square_()  # [local rows]
        return out.index_add_(0, info.ids, row_sq)
    if axis == 1:
        dims = (0,) + tuple(range(2, g.dim()))
        col_sq = torch.linalg.vector_norm(g, 2, dim=dims).square_()  # [columns]
        return out.index_add_(0, info.ids, col_sq)
    if axis == 2:  # [local slices, in, out]: per (slice, column)
        col_sq = torch.linalg.vector_norm(g, 2, dim=1).square_().reshape(-1)
        return out.index_add_(0, info.ids, col_sq)
    flat = g.reshape(-1)
    ((_, unit),) = segments
    if unit == 1:
        return flat * flat
    f0 = layout.rows[0] * math.prod(layout.shape[1:])
    n = flat.numel()
    head = min((-f0) % unit, n)  # tail of a block that started on a lower rank
    full = (n - head) // unit
    parts = []
    if head:
        parts.append(torch.linalg.vector_norm(flat[:head]).square().reshape(1))
    if full:
        body = flat[head:head + full * unit].view(full, unit)
        parts.append(torch.linalg.vector_norm(body, 2, dim=1).square_())
    if head + full * unit < n:  # start of a block that continues on a higher rank
        parts.append(torch.linalg.vector_norm(flat[head + full * unit:]).square().reshape(1))
    return torch.cat(parts)


def expand_denominator(denom: torch.Tensor, info: ShardInfo) -> torch.Tensor:
    """The per-block denominator (``num_local_blocks``) broadcastable to the local shard."""
    layout = info.layout
    axis, segments = layout.geometry
    local_shape = info.local_shape
    ndim = len(local_shape)
    if axis == 0:
        return denom[info.ids].view((local_shape[0],) + (1,) * (ndim - 1))
    if axis == 1:
        return denom[info.ids].view((1, local_shape[1]) + (1,) * (ndim - 2))
    if axis == 2:
        return denom[info.ids].view(local_shape[0], 1, local_shape[2])
    ((_, unit),) = segments
    if unit == 1:
        return denom.view(local_shape)
    if denom.numel() == 1:
        return denom.view((1,) * ndim)
    # blocks of `unit` flat elements that do not follow rows: elements of each local block
    f0 = layout.rows[0] * math.prod(layout.shape[1:])
    f1 = f0 + math.prod(local_shape)
    lo, hi = layout.blocks
    sizes = [min(f1, (b + 1) * unit) - max(f0, b * unit) for b in range(lo, hi)]
    reps = torch.tensor(sizes, dtype=torch.int64, device=denom.device)
    return denom.repeat_interleave(reps, output_size=f1 - f0).view(local_shape)
