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

The step (:func:`zero_step`) adds up those sums with FSDP2's reduction
(:func:`blockopt.distributed.step.reduce_shared_blocks`), then updates each piece with
:func:`blockopt.kernels.adam_mini.adam_mini_update` on views of the flat partition, with the block
denominators gathered by each element's block id.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Any, NamedTuple

import torch

from ..kernels.adam_mini import adam_mini_update
from ..kernels.blocks import Geometry, block_sizes, coordinate_table, is_elementwise
from ..partition import PlanEntry
from .sharding import _merge
from .step import reduce_shared_blocks

__all__ = ["FlatLayout", "Piece", "ZeroTensors", "flat_block_ids", "flat_layout", "flat_layout_stage3",
           "layout_of_pieces", "touched_blocks", "zero_state", "zero_step"]


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


def zero_state(flat: torch.Tensor, layout: FlatLayout) -> dict[str, torch.Tensor]:
    """The initial state of a flat partition: ``step``, ``exp_avg`` and the ``block_exp_avg_sq`` of
    the blocks its pieces touch (fp32 state for bf16/fp16 partitions)."""
    dtype = torch.float32 if flat.dtype in (torch.float16, torch.bfloat16) else flat.dtype
    return {"step": torch.tensor(0.0, dtype=torch.float32), "exp_avg": torch.zeros_like(flat, dtype=dtype),
            "block_exp_avg_sq": torch.zeros(layout.num_v, dtype=dtype, device=flat.device)}


@dataclass
class ZeroTensors:
    """One flat partition with a gradient, as the step reads it: the partition, its gradient, its
    state (:func:`zero_state`), its layout and its parameter group's hyperparameters (``lr``,
    ``beta1``, ``beta2``, ``eps``, ``weight_decay``, ``maximize``)."""

    param: torch.Tensor
    grad: torch.Tensor
    exp_avg: torch.Tensor
    second_moment: torch.Tensor
    step: torch.Tensor
    layout: FlatLayout
    hyper: dict[str, Any]


class _Shared(NamedTuple):  # a flat partition's slots of the reduction buffer (see SharedBlocks)
    group: Any
    num_shared: int
    shared_local: torch.Tensor
    shared_pos: torch.Tensor


def zero_step(parts: Sequence[ZeroTensors], group: Any) -> None:
    """One step of every flat partition: block sums per piece, one ``all_reduce`` on ``group`` for
    the blocks split between ranks (FSDP2's :func:`~blockopt.distributed.step.reduce_shared_blocks`),
    then :func:`~blockopt.kernels.adam_mini.adam_mini_update` on each piece."""
    grads, ids, sums = [], [], []
    for t in parts:
        layout, dtype, device = t.layout, t.exp_avg.dtype, t.param.device
        g = t.grad.to(dtype)
        if t.hyper["maximize"]:
            g = -g
        s = torch.zeros(layout.num_v, dtype=dtype, device=device)
        piece_ids = []
        for pc in layout.pieces:
            i = flat_block_ids(pc.entry.shape, pc.entry.geometry, pc.start, pc.start + pc.length, device) - pc.blocks[0]
            piece_ids.append(i)
            if not is_elementwise(pc.entry.geometry):
                gp = g.narrow(0, pc.offset, pc.length)
                s.narrow(0, pc.v_offset, pc.blocks[1] - pc.blocks[0]).index_add_(0, i, gp * gp)
        grads.append(g)
        ids.append(piece_ids)
        sums.append(s)
    reduce_shared_blocks(sums, [_Shared(group, t.layout.buffer_len, t.layout.shared_local, t.layout.shared_pos)
                                for t in parts])
    for t, g, piece_ids, s in zip(parts, grads, ids, sums):
        _update_pieces(t, g, piece_ids, s)


def _update_pieces(t: ZeroTensors, g: torch.Tensor, ids: list[torch.Tensor], sums: torch.Tensor) -> None:
    """The update of one flat partition, piece by piece, given its reduced block sums."""
    layout = t.layout
    spans = [(pc.offset, pc.length, pc.v_offset, pc.blocks[1] - pc.blocks[0]) for pc in layout.pieces]
    stats = [None if is_elementwise(pc.entry.geometry) else sums.narrow(0, vo, nb) / layout.counts.narrow(0, vo, nb).to(sums.dtype)
             for pc, (_, _, vo, nb) in zip(layout.pieces, spans)]

    def applier(block_ids: torch.Tensor):
        def apply(w: torch.Tensor, m: torch.Tensor, denom: torch.Tensor, step_size: float) -> None:
            w.addcdiv_(m, denom[block_ids], value=-step_size)
        return apply

    h = t.hyper
    adam_mini_update([t.param.detach().narrow(0, o, n) for o, n, _, _ in spans], [g.narrow(0, o, n) for o, n, _, _ in spans],
                     [t.exp_avg.narrow(0, o, n) for o, n, _, _ in spans],
                     [t.second_moment.narrow(0, vo, nb) for _, _, vo, nb in spans], [t.step.clone() for _ in spans],
                     stats, [pc.entry.weight_decay for pc in layout.pieces], [applier(i) for i in ids], lr=h["lr"],
                     beta1=h["beta1"], beta2=h["beta2"], eps=h["eps"], weight_decay=h["weight_decay"], maximize=False)
    t.step.add_(1.0)
