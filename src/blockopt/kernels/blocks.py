"""Block geometry: how a tensor is cut into the blocks that share one second moment.

A geometry is plain data, ``(axis, segments)``:

* ``axis`` is the dimension that indexes output neurons: ``0`` for the PyTorch
  ``Linear``/``Embedding``/``Conv`` convention, ``1`` for layers stored
  transposed (Hugging Face ``Conv1D``, ``ConvTranspose``), or ``-1`` for "the
  tensor flattened to one dimension". ``2`` is for stacked matrices stored
  transposed, ``[S, in, out]`` (mixture-of-experts weights of some families):
  the coordinate is the pair (slice, column), numbered slice-major over
  ``S * out`` indices, and a block holds its columns' entries of every row of
  that slice only. Blocks of axis ``2`` never span two slices.
* ``segments`` is a tuple of ``(size, unit)`` pairs that split that axis into
  consecutive runs; within a run every ``unit`` consecutive indices (with
  everything along the other dimensions) form one block. A fused QKV weight
  is three segments, e.g. ``((H*dh, dh), (Hkv*dh, dh), (Hkv*dh, 1))``.

A **factored** geometry, ``(3, ((rows, 1), (cols, 1)))`` (:data:`FACTORED`), is not a cut into blocks:
a 2-D tensor keeps one second moment per row and one per column (``rows + cols`` values, rows first),
and an element's second moment is their rank-1 product, ``v_ij = R_i * C_j / mean(R)`` (Adafactor's
estimate, with Adam's first moment kept whole). The functions below that map elements to blocks refuse
it; the step functions handle it (:mod:`blockopt.kernels.adam_mini`).

Per-element blocks are ``(-1, ((numel, 1),))`` and one block for the whole
tensor is ``(-1, ((numel, numel),))``. Stacked experts stored ``[E, out, in]``
get one block per expert and output neuron as ``(-1, ((numel, in),))`` (runs of
``in`` consecutive elements); stored ``[E, in, out]``, as ``(2, ((E * out, 1),))``. This module knows nothing of models or
optimizers; the partition engine produces geometries and the kernels consume
them.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch

Segments = tuple[tuple[int, int], ...]


class Geometry(NamedTuple):
    axis: int
    segments: Segments

    @property
    def num_blocks(self) -> int:
        return sum(size // unit for size, unit in self.segments)


#: the ``axis`` of a factored geometry (row and column second moments, see above)
FACTORED = 3


def factored_geometry(shape: tuple[int, ...]) -> Geometry:
    """The factored geometry of a 2-D tensor of ``shape``: ``rows + cols`` second-moment values."""
    if len(shape) != 2:
        raise ValueError(f"a factored second moment needs a 2-D tensor, got shape {list(shape)}")
    return Geometry(FACTORED, ((int(shape[0]), 1), (int(shape[1]), 1)))


def is_factored(geometry: Geometry) -> bool:
    """Row and column second moments whose product stands for each element's (not blocks)."""
    return geometry.axis == FACTORED


def _refuse_factored(geometry: Geometry, what: str) -> None:
    if geometry.axis == FACTORED:
        raise ValueError(f"a factored second moment has no blocks: {what} needs a block geometry "
                         "(plans built with factored=False, e.g. AdamMini(model, rules='blocks'))")


def is_elementwise(geometry: Geometry) -> bool:
    """One block per element (``v`` is AdamW's)."""
    return geometry.axis == -1 and geometry.segments[0][1] == 1


def check_geometry(shape: tuple[int, ...], geometry: Geometry) -> None:
    """Raise ``ValueError`` if ``geometry`` does not tile a tensor of ``shape``."""
    axis, segments = geometry
    if axis not in (-1, 0, 1, 2, FACTORED):
        raise ValueError(f"Invalid geometry axis: {axis}; allowed: -1, 0, 1, 2, {FACTORED} (factored)")
    if axis == FACTORED:
        if len(shape) != 2 or tuple(segments) != ((shape[0], 1), (shape[1], 1)):
            raise ValueError(f"geometry axis {FACTORED} (factored) needs a 2-D tensor and the segments "
                             f"((rows, 1), (cols, 1)); got shape {list(shape)} and segments {list(segments)}")
        return
    if axis == -1:
        length = math.prod(shape)
    elif axis == 2:
        if len(shape) != 3:
            raise ValueError(f"Invalid geometry axis: 2 (stacked [S, in, out]) needs a 3-D tensor, got shape {list(shape)}")
        length = shape[0] * shape[2]
    elif axis < len(shape):
        length = shape[axis]
    else:
        raise ValueError(f"geometry axis {axis} does not exist in a tensor of shape {list(shape)}")
    if not segments:
        raise ValueError("geometry has no segments")
    if axis == -1 and len(segments) != 1:
        raise ValueError(f"geometry axis -1 (flattened) takes exactly one segment, got {list(segments)}")
    if sum(size for size, _ in segments) != length:
        raise ValueError(
            f"geometry segments {list(segments)} cover {sum(s for s, _ in segments)} indices "
            f"along axis {axis}, but the tensor of shape {list(shape)} has {length}"
        )
    start = 0
    for size, unit in segments:
        if unit <= 0 or size % unit != 0:
            raise ValueError(f"geometry segment of size {size} is not divisible into blocks of {unit}")
        if axis == 2 and (shape[2] % unit or start % unit):
            raise ValueError(
                f"geometry axis 2: blocks of {unit} columns starting at {start} would span two slices of "
                f"a tensor of shape {list(shape)}"
            )
        start += size


def _slice_pieces(geometry: Geometry, cols: int) -> list[tuple[int, int, int, int]]:
    """Axis 2: ``(slice, first column, columns, unit)`` runs in block order."""
    out = []
    start = 0
    for size, unit in geometry.segments:
        pos, end = start, start + size
        while pos < end:
            s, c0 = divmod(pos, cols)
            n = min(end - pos, cols - c0)
            out.append((s, c0, n, unit))
            pos += n
        start = end
    return out


def block_views(t: torch.Tensor, geometry: Geometry) -> list[torch.Tensor]:
    """Views (never copies) of ``t``, one per segment (axis 2: per slice and segment), whose dim 0
    indexes blocks, in block order.

    Writing into a returned view writes into ``t``. Each view has shape
    ``[num_blocks_of_segment, ...]``; a block is everything behind index ``i``
    of dim 0. When ``t`` cannot be flattened without a copy (``axis == -1`` on a
    non-contiguous tensor), the whole-tensor case returns ``t.unsqueeze(0)`` and
    the per-element case raises ``ValueError`` (callers handle element-wise
    blocks without views). The shape of a view depends on ``t``'s memory layout
    (``[nb, unit * rest]`` when contiguous, ``[nb, unit, *rest]`` otherwise), so
    pair views of two tensors with ``reshape`` to a common shape.
    """
    _refuse_factored(geometry, "block_views")
    axis, segments = geometry
    if axis == 2:  # one view per slice (and segment): [blocks, unit, rows]
        moved = t.movedim(2, 1)
        return [moved[s].narrow(0, c0, n).unflatten(0, (n // unit, unit))
                for s, c0, n, unit in _slice_pieces(geometry, t.shape[2])]
    if axis == -1:
        (size, unit), = segments  # axis -1 always has one segment
        if t.is_contiguous():
            return [t.view(size // unit, unit)]
        if unit == size:
            return [t.unsqueeze(0)]
        raise ValueError("per-element blocks need a contiguous tensor")
    moved = t.movedim(axis, 0) if axis else t
    views = []
    start = 0
    for size, unit in segments:
        piece = moved.narrow(0, start, size).unflatten(0, (size // unit, unit))
        if piece.is_contiguous():
            piece = piece.view(size // unit, -1)
        views.append(piece)
        start += size
    return views


def coordinate_block_ids(geometry: Geometry, start: int = 0, stop: int | None = None) -> torch.Tensor:
    """Block id (int64) of every index ``[start, stop)`` of the geometry's coordinate.

    The coordinate is what the segments cut: the index along ``axis`` (rows for ``0``, columns for
    ``1``), the (slice, column) pair numbered slice-major for ``2``, the flat element for ``-1``.
    This is the one place the geometry-to-block-id arithmetic is written: the block index map,
    the shard layouts (:mod:`blockopt.distributed.sharding`), the ZeRO pieces
    (:mod:`blockopt.distributed.zero`), the fused kernel's column maps and the SNR sampler all call
    it (the reference step keeps an independent copy on purpose, as a check).
    """
    _refuse_factored(geometry, "coordinate_block_ids")
    stop = sum(size for size, _ in geometry.segments) if stop is None else stop
    parts = []
    first = seg_start = 0
    for size, unit in geometry.segments:
        a, b = max(start, seg_start), min(stop, seg_start + size)
        if a < b:
            parts.append(first + torch.div(torch.arange(a, b) - seg_start, unit, rounding_mode="floor"))
        seg_start += size
        first += size // unit
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)


def coordinate_ids_at(geometry: Geometry, coords: torch.Tensor) -> torch.Tensor:
    """Block id (int64) of each coordinate index in ``coords`` (any int tensor): the same arithmetic as
    :func:`coordinate_block_ids`, for scattered indices (no table of the whole coordinate)."""
    starts, firsts, units = [], [], []
    seg_start = first = 0
    for size, unit in geometry.segments:
        starts.append(seg_start)
        firsts.append(first)
        units.append(unit)
        seg_start += size
        first += size // unit
    coords = coords.to(torch.int64)
    seg = torch.searchsorted(torch.tensor(starts), coords, right=True) - 1
    return (torch.tensor(firsts)[seg]
            + torch.div(coords - torch.tensor(starts)[seg], torch.tensor(units)[seg], rounding_mode="floor"))


def element_block_ids(shape: tuple[int, ...], geometry: Geometry, flat: torch.Tensor) -> torch.Tensor:
    """Block id (int64) of the elements at flat indices ``flat`` of a contiguous tensor of ``shape``
    (:func:`block_index` at those indices, without building it)."""
    _refuse_factored(geometry, "element_block_ids")
    flat = flat.to(torch.int64)
    axis = geometry.axis
    if axis == -1:
        coords = flat
    elif axis == 2:  # (slice, column), slice-major
        _, rows, cols = shape
        coords = torch.div(flat, rows * cols, rounding_mode="floor") * cols + flat % cols
    else:
        inner = math.prod(shape[axis + 1:])
        coords = torch.div(flat, inner, rounding_mode="floor") % shape[axis]
    return coordinate_ids_at(geometry, coords)


@functools.lru_cache(maxsize=1024)
def coordinate_table(geometry: Geometry) -> torch.Tensor:
    """:func:`coordinate_block_ids` of the whole coordinate, built once per geometry (cached: read
    only). Its values never decrease along the coordinate."""
    return coordinate_block_ids(geometry)


def block_of(geometry: Geometry, index: int) -> int:
    """Block id of coordinate index ``index``."""
    ids = coordinate_block_ids(geometry, index, index + 1)
    if not ids.numel():
        raise IndexError(f"index {index} is beyond the geometry {geometry}")
    return int(ids)


def block_coordinates(geometry: Geometry, block: int) -> torch.Tensor:
    """The coordinate indices of block ``block`` (int64, ascending): the inverse of
    :func:`coordinate_block_ids`, read from :func:`coordinate_table`."""
    table = coordinate_table(geometry)
    lo = int(torch.searchsorted(table, block))
    hi = int(torch.searchsorted(table, block, right=True))
    if lo == hi:
        raise IndexError(block)
    return torch.arange(lo, hi)


def block_index(shape: tuple[int, ...], geometry: Geometry) -> torch.Tensor:
    """Block id of every element of a tensor of ``shape`` (int64, same shape).

    Built by plain index arithmetic (:func:`coordinate_block_ids` broadcast over the other
    dimensions), independently of :func:`block_views`, so tests can check the views against it.
    """
    axis = geometry.axis
    along = coordinate_block_ids(geometry)
    if axis == -1:
        return along.reshape(shape)
    if axis == 2:  # coordinate (slice, column), slice-major; every row of the slice shares it
        return along.reshape(shape[0], 1, shape[2]).expand(shape).clone()
    view_shape = [1] * len(shape)
    view_shape[axis] = shape[axis]
    return along.reshape(view_shape).expand(shape).clone()


def block_sizes(shape: tuple[int, ...], geometry: Geometry) -> list[int]:
    """Number of elements of every block, in block order (plain arithmetic on the shape)."""
    _refuse_factored(geometry, "block_sizes")
    axis, segments = geometry
    if axis == -1:
        ((size, unit),) = segments
        return [unit] * (size // unit)
    if axis == 2:
        other = shape[1]
    else:
        other = math.prod(shape) // shape[axis] if shape[axis] else 0
    out: list[int] = []
    for size, unit in segments:
        out += [unit * other] * (size // unit)
    return out
