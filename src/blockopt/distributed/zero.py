"""AdamMini under DeepSpeed ZeRO stages 1 and 2: the flat partition a rank optimizes, mapped back
onto the plan.

ZeRO-1/2 flattens each parameter group into one buffer (each parameter at a known offset, with
alignment padding), splits it into ``world`` equal partitions, and hands the client optimizer one
flat fp32 tensor per group: this rank's partition. A partition holds *pieces* of parameters: a
run of consecutive (flattened, row-major) elements of one parameter. This module works out, from
the offsets, the partition size and the rank alone (so every rank agrees without communicating):

* which blocks of the plan each piece touches, and the global element count of each;
* which blocks are touched by two ranks or more (a head or a row split by a partition boundary, a
  column block of any tensor spread over several partitions): their sums are added up with one
  ``all_reduce`` per step for all parameters.

The update of each piece is :func:`blockopt.kernels.adam_mini.adam_mini_update` on views of the
flat partition, with the block denominators gathered by each element's block id.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import pairwise

import torch

from ..kernels.blocks import Geometry, block_sizes, coordinate_table, is_elementwise
from ..partition import PlanEntry
from .sharding import _merge

__all__ = ["FlatLayout", "Piece", "flat_block_ids", "flat_layout", "flat_layout_stage3", "layout_of_pieces",
           "touched_blocks"]


def flat_block_ids(shape: tuple[int, ...], geometry: Geometry, a: int, b: int,
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """Global block id (int64) of the flattened (row-major) elements ``[a, b)`` of a tensor."""
    i = torch.arange(a, b, device=device)
    axis = geometry.axis
    if axis == -1:
        return i // geometry.segments[0][1]
    table = coordinate_table(geometry).to(device)
    if axis == 0:
        return table[i // (math.prod(shape[1:]) or 1)]
    if axis == 1:
        return table[(i // (math.prod(shape[2:]) or 1)) % shape[1]]
    rows, cols = shape[1], shape[2]  # axis 2: [S, in, out], coordinate (slice, column)
    return table[(i // (rows * cols)) * cols + i % cols]


def touched_blocks(shape: tuple[int, ...], geometry: Geometry, a: int, b: int) -> tuple[int, int]:
    """Block ids ``[lo, hi)`` covering the elements ``[a, b)`` (column blocks: all of them)."""
    if a >= b:
        return (0, 0)
    if geometry.axis == 1:
        return (0, geometry.num_blocks)
    ids = flat_block_ids(shape, geometry, a, a + 1).tolist() + flat_block_ids(shape, geometry, b - 1, b).tolist()
    if geometry.axis == 2:  # a slice's blocks are not in element order: cover the slices touched
        rows, cols = shape[1], shape[2]
        s0, s1 = a // (rows * cols), (b - 1) // (rows * cols)
        table = coordinate_table(geometry)
        return (int(table[s0 * cols:(s0 + 1) * cols].min()), int(table[s1 * cols:(s1 + 1) * cols].max()) + 1)
    return (ids[0], ids[1] + 1)


@dataclass(frozen=True)
class Piece:
    """A run of one parameter's elements inside this rank's flat partition."""

    name: str
    entry: PlanEntry
    offset: int  # first element in the partition
    length: int
    start: int  # first element in the parameter (flattened)
    blocks: tuple[int, int]  # global block ids [lo, hi) it touches (its slice of the flat v)
    v_offset: int  # where that slice starts in the partition's v


@dataclass
class FlatLayout:
    """One rank's flat partition of one ZeRO parameter group: its pieces, its second-moment vector
    (the touched blocks of every piece, concatenated), the global size of each of those blocks, and
    the positions of the shared blocks in the step's reduction buffer."""

    pieces: list[Piece]
    num_v: int
    counts: torch.Tensor  # float64 [num_v]: global element count of each block
    shared_local: torch.Tensor  # int64: indices into v of the shared blocks
    shared_pos: torch.Tensor  # int64: their positions in the reduction buffer
    signature: str  # what a checkpoint must match (world size, rank, layout)
    buffer_len: int = 0  # slots of the reduction buffer its shared blocks use (positions start at 0)


def flat_layout(entries: list[PlanEntry], offsets: list[int], partition_size: int, rank: int, world: int,
                buffer_start: int = 0) -> tuple[FlatLayout, int]:
    """ZeRO-1/2: the layout of rank ``rank`` for a group whose parameters (``entries``, in
    flattening order) sit at ``offsets`` of the group's flat buffer, split into ``world`` partitions
    of ``partition_size``; and the number of reduction-buffer slots it uses. The same on every rank."""
    ranges, flat_offsets = [], []
    for entry, off in zip(entries, offsets, strict=True):
        per_rank = []
        for r in range(world):
            lo, hi = max(off, r * partition_size), min(off + entry.numel, (r + 1) * partition_size)
            per_rank.append((lo - off, hi - off) if lo < hi else (0, 0))
        ranges.append(per_rank)
        flat_offsets.append(off + per_rank[rank][0] - rank * partition_size)
    return layout_of_pieces(entries, ranges, flat_offsets, rank, world,
                            f"zero-1/2 world={world} rank={rank} partition={partition_size} offsets={offsets}",
                            buffer_start)


def flat_layout_stage3(entries: list[PlanEntry], partition_sizes: list[int], rank: int, world: int,
                       buffer_start: int = 0) -> tuple[FlatLayout, int]:
    """ZeRO-3: every parameter is split on its own (rank ``r`` holds its flattened elements
    ``[r * size, (r + 1) * size)``), and a sub-group's flat buffer is this rank's pieces, in order."""
    ranges, flat_offsets, off = [], [], 0
    for entry, size in zip(entries, partition_sizes, strict=True):
        ranges.append([(min(r * size, entry.numel), min((r + 1) * size, entry.numel)) for r in range(world)])
        flat_offsets.append(off)
        off += size
    return layout_of_pieces(entries, ranges, flat_offsets, rank, world,
                            f"zero-3 world={world} rank={rank} sizes={partition_sizes}", buffer_start)


def layout_of_pieces(entries: list[PlanEntry], ranges: list[list[tuple[int, int]]], flat_offsets: list[int],
                     rank: int, world: int, what: str, buffer_start: int = 0) -> tuple[FlatLayout, int]:
    """The layout, given for each parameter every rank's element range and where this rank's piece
    starts in its flat tensor."""
    pieces: list[Piece] = []
    shared_local: list[int] = []
    shared_pos: list[int] = []
    counts: list[torch.Tensor] = []
    v_off = 0
    pos = buffer_start
    for entry, per_rank, flat_off in zip(entries, ranges, flat_offsets, strict=True):
        shape, geo = entry.shape, entry.geometry
        touched = [touched_blocks(shape, geo, a, b) for a, b in per_rank]
        nonempty = [t for t in touched if t[0] < t[1]]
        shared = () if is_elementwise(geo) else _merge(
            [(max(x[0], y[0]), min(x[1], y[1])) for x, y in pairwise(sorted(nonempty))])
        a, b = per_rank[rank]
        lo, hi = touched[rank]
        if a < b:
            pieces.append(Piece(entry.name, entry, flat_off, b - a, a, (lo, hi), v_off))
            counts.append(torch.tensor(block_sizes(shape, geo)[lo:hi], dtype=torch.float64))
        slot = pos
        for s0, s1 in shared:
            if a < b:
                for gid in range(max(s0, lo), min(s1, hi)):
                    shared_local.append(v_off + gid - lo)
                    shared_pos.append(slot + gid - s0)
            slot += s1 - s0
        pos = slot
        if a < b:
            v_off += hi - lo
    signature = what + " " + ";".join(f"{e.name}:{list(e.shape)}:{e.describe()}" for e in entries)
    layout = FlatLayout(pieces, v_off, torch.cat(counts) if counts else torch.zeros(0, dtype=torch.float64),
                        torch.tensor(shared_local, dtype=torch.int64), torch.tensor(shared_pos, dtype=torch.int64),
                        signature, pos - buffer_start)
    return layout, pos - buffer_start
