"""Block geometry: how a tensor is cut into the blocks that share one second moment.

A geometry is plain data, ``(axis, segments)``:

* ``axis`` is the dimension that indexes output neurons: ``0`` for the PyTorch
  ``Linear``/``Embedding``/``Conv`` convention, ``1`` for layers stored
  transposed (Hugging Face ``Conv1D``, ``ConvTranspose``), or ``-1`` for "the
  tensor flattened to one dimension".
* ``segments`` is a tuple of ``(size, unit)`` pairs that split that axis into
  consecutive runs; within a run every ``unit`` consecutive indices (with
  everything along the other dimensions) form one block. A fused QKV weight
  is three segments, e.g. ``((H*dh, dh), (Hkv*dh, dh), (Hkv*dh, 1))``.

Per-element blocks are ``(-1, ((numel, 1),))`` and one block for the whole
tensor is ``(-1, ((numel, numel),))``. This module knows nothing of models or
optimizers; the partition engine produces geometries and the kernels consume
them.
"""

from __future__ import annotations

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


def check_geometry(shape: tuple[int, ...], geometry: Geometry) -> None:
    """Raise ``ValueError`` if ``geometry`` does not tile a tensor of ``shape``."""
    axis, segments = geometry
    if axis not in (-1, 0, 1):
        raise ValueError(f"Invalid geometry axis: {axis}; allowed: -1, 0, 1")
    if axis == -1:
        length = math.prod(shape)
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
    for size, unit in segments:
        if unit <= 0 or size % unit != 0:
            raise ValueError(f"geometry segment of size {size} is not divisible into blocks of {unit}")


def block_views(t: torch.Tensor, geometry: Geometry) -> list[torch.Tensor]:
    """Views (never copies) of ``t``, one per segment, whose dim 0 indexes blocks.

    Writing into a returned view writes into ``t``. Each view has shape
    ``[num_blocks_of_segment, ...]``; a block is everything behind index ``i``
    of dim 0. When ``t`` cannot be flattened without a copy (``axis == -1`` on a
    non-contiguous tensor), the whole-tensor case returns ``t.unsqueeze(0)`` and
    the per-element case raises ``ValueError`` (callers handle element-wise
    blocks without views). The shape of a view depends on ``t``'s memory layout
    (``[nb, unit * rest]`` when contiguous, ``[nb, unit, *rest]`` otherwise), so
    pair views of two tensors with ``reshape`` to a common shape.
    """
    axis, segments = geometry
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


def block_index(shape: tuple[int, ...], geometry: Geometry) -> torch.Tensor:
    """Block id of every element of a tensor of ``shape`` (int64, same shape).

    Built by plain index arithmetic, independently of :func:`block_views`, so
    the reference kernel that uses it is a check on the views.
    """
    axis, segments = geometry
    numel = math.prod(shape)
    if axis == -1:
        (size, unit), = segments
        return (torch.arange(numel) // unit).reshape(shape)
    # id of every index along the axis
    ids_along_axis = []
    first_block = 0
    for size, unit in segments:
        ids_along_axis.append(first_block + torch.arange(size) // unit)
        first_block += size // unit
    along = torch.cat(ids_along_axis)
    view_shape = [1] * len(shape)
    view_shape[axis] = shape[axis]
    return along.reshape(view_shape).expand(shape).clone()
