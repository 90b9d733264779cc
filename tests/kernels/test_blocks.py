"""Block geometry (``blockopt.kernels.blocks``): views, index maps and validation.

``block_index`` is built by plain index arithmetic and is the ground truth the
reference kernel uses; ``block_views`` is what the fast kernels use. The tests
below write each block's id through the views and compare the result with
``block_index``: that checks at once that the views are views (writes reach the
tensor) and that both functions cut the tensor the same way.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from blockopt.kernels.blocks import Geometry, block_index, block_views, check_geometry

# ---------------------------------------------------------------------------
# helpers


def _fill_block_ids(t: torch.Tensor, geometry: Geometry) -> None:
    """Write every block's global id into ``t`` through ``block_views``."""
    first = 0
    for view in block_views(t, geometry):
        n = view.shape[0]
        ids = torch.arange(first, first + n, dtype=t.dtype).view((n,) + (1,) * (view.dim() - 1))
        view.copy_(ids.expand_as(view))
        first += n
    assert first == geometry.num_blocks


def _layouts(shape: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """Tensors of logical ``shape`` with different memory layouts (float64, filled with -1)."""
    out = {"contiguous": torch.full(shape, -1.0, dtype=torch.float64)}
    if len(shape) >= 2:
        # transposed storage: allocate the reversed shape and permute back
        rev = tuple(reversed(shape))
        out["transposed"] = torch.full(rev, -1.0, dtype=torch.float64).permute(*reversed(range(len(shape))))
        # every other column of a wider tensor
        wide = (shape[0], 2 * shape[1]) + tuple(shape[2:])
        out["strided"] = torch.full(wide, -1.0, dtype=torch.float64)[:, ::2]
    else:
        out["strided"] = torch.full((2 * shape[0],), -1.0, dtype=torch.float64)[::2]
    for name, t in out.items():
        assert t.shape == torch.Size(shape)
        assert t.is_contiguous() == (name == "contiguous")
    return out


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _random_geometry(rng: random.Random, shape: tuple[int, ...]) -> Geometry:
    """Any valid geometry for ``shape``: axis -1 (one segment) or axis 0/1 with 1-3 segments."""
    axes = [-1, 0] + ([1] if len(shape) >= 2 else [])
    axis = rng.choice(axes)
    if axis == -1:
        n = math.prod(shape)
        return Geometry(-1, ((n, rng.choice(_divisors(n))),))
    length = shape[axis]
    # split `length` into 1-3 consecutive runs, each cut into blocks of a divisor of its size
    cuts = sorted(rng.sample(range(1, length), k=min(length - 1, rng.randint(0, 2))))
    sizes = [b - a for a, b in zip([0, *cuts], [*cuts, length])]
    return Geometry(axis, tuple((s, rng.choice(_divisors(s))) for s in sizes))


def _random_cases(n: int, seed: int = 0) -> list[tuple[tuple[int, ...], Geometry]]:
    rng = random.Random(seed)
    cases = []
    for _ in range(n):
        ndim = rng.randint(1, 4)
        # sizes >= 2, so that the permuted/strided layouts really are non-contiguous
        shape = tuple(rng.randint(2, 12 if ndim <= 2 else 6) for _ in range(ndim))
        cases.append((shape, _random_geometry(rng, shape)))
    return cases


# ---------------------------------------------------------------------------
# golden index maps, computed by hand


@pytest.mark.parametrize(
    "shape, geometry, expected",
    [
        # fused rows: 2 "heads" of 2 rows, then 2 single rows -> 4 blocks
        ((6, 2), Geometry(0, ((4, 2), (2, 1))), [[0, 0], [0, 0], [1, 1], [1, 1], [2, 2], [3, 3]]),
        # Conv1D-style: blocks are columns; one head of 2 columns, then 4 single columns
        ((2, 6), Geometry(1, ((2, 2), (4, 1))), [[0, 0, 1, 2, 3, 4], [0, 0, 1, 2, 3, 4]]),
        # flattened: blocks of 3 consecutive elements in row-major order
        ((2, 3), Geometry(-1, ((6, 3),)), [[0, 0, 0], [1, 1, 1]]),
        # per element
        ((2, 2), Geometry(-1, ((4, 1),)), [[0, 1], [2, 3]]),
        # whole tensor
        ((2, 2), Geometry(-1, ((4, 4),)), [[0, 0], [0, 0]]),
        # 3-D, per slice of dim 0 (a conv weight per output channel)
        ((2, 1, 2), Geometry(0, ((2, 1),)), [[[0, 0]], [[1, 1]]]),
    ],
)
def test_block_index_golden(shape, geometry, expected):
    idx = block_index(shape, geometry)
    assert idx.dtype == torch.int64
    assert idx.tolist() == expected


def test_num_blocks_counts_every_segment():
    assert Geometry(0, ((32, 8), (16, 8), (16, 1))).num_blocks == 4 + 2 + 16
    assert Geometry(-1, ((12, 12),)).num_blocks == 1
    assert Geometry(-1, ((12, 1),)).num_blocks == 12


# ---------------------------------------------------------------------------
# block_views: views, not copies


def test_block_views_share_storage_and_writes_propagate():
    t = torch.zeros(6, 4)
    views = block_views(t, Geometry(0, ((4, 2), (2, 1))))
    assert [v.shape[0] for v in views] == [2, 2]
    for v in views:
        assert v.untyped_storage().data_ptr() == t.untyped_storage().data_ptr()
    views[0][1].fill_(7.0)  # second head = rows 2..3
    views[1][0].fill_(3.0)  # first single row = row 4
    expected = torch.zeros(6, 4)
    expected[2:4] = 7.0
    expected[4] = 3.0
    torch.testing.assert_close(t, expected, rtol=0, atol=0)


def test_block_views_axis1_writes_columns():
    t = torch.zeros(3, 5)
    (view,) = block_views(t, Geometry(1, ((5, 1),)))
    assert view.shape[0] == 5
    view[2].fill_(1.0)
    expected = torch.zeros(3, 5)
    expected[:, 2] = 1.0
    torch.testing.assert_close(t, expected, rtol=0, atol=0)


@pytest.mark.parametrize("case", range(60))
def test_block_views_agree_with_block_index_random(case):
    """Writing block ids through the views reproduces block_index, for every layout."""
    shape, geometry = _random_cases(60, seed=1234)[case]
    check_geometry(shape, geometry)  # the generator only makes valid geometries
    expected = block_index(shape, geometry).to(torch.float64)
    for name, t in _layouts(shape).items():
        if geometry.axis == -1 and not t.is_contiguous() and geometry.segments[0][1] != geometry.segments[0][0]:
            continue  # flattening a non-contiguous tensor needs a copy; only whole-tensor is a view
        _fill_block_ids(t, geometry)
        torch.testing.assert_close(t, expected, rtol=0, atol=0, msg=f"{name} {shape} {geometry}")


def test_random_cases_cover_interesting_geometries():
    """Guard against a generator that silently stops producing the hard cases."""
    cases = _random_cases(60, seed=1234)
    axes = {g.axis for _, g in cases}
    assert axes == {-1, 0, 1}
    assert any(len(g.segments) >= 2 for _, g in cases)  # fused
    assert any(any(1 < u < s for s, u in g.segments) for _, g in cases)  # head-like units
    assert any(len(s) >= 3 and g.axis in (0, 1) for s, g in cases)  # conv-like tensors


@pytest.mark.parametrize("layout", ["transposed", "strided"])
@pytest.mark.parametrize(
    "geometry",
    [Geometry(0, ((8, 4), (4, 4), (4, 1))), Geometry(1, ((6, 2),)), Geometry(1, ((2, 2), (4, 1))),
     Geometry(-1, ((96, 96),))],
    ids=["fused-rows", "column-heads", "fused-columns", "whole"],
)
def test_block_views_non_contiguous_are_views(layout, geometry):
    t = _layouts((16, 6))[layout]
    for v in block_views(t, geometry):
        assert v.untyped_storage().data_ptr() == t.untyped_storage().data_ptr()
    _fill_block_ids(t, geometry)
    torch.testing.assert_close(t, block_index((16, 6), geometry).to(t.dtype), rtol=0, atol=0)


def test_block_views_mean_per_block_matches_index_add():
    """The reduction the kernels do over a view equals a scatter mean over block_index."""
    g = torch.Generator().manual_seed(0)
    t = torch.randn(8, 3, 2, generator=g, dtype=torch.float64)
    geometry = Geometry(0, ((4, 2), (4, 1)))
    means = torch.cat([v.pow(2).flatten(1).mean(1) for v in block_views(t, geometry)])
    idx = block_index(tuple(t.shape), geometry).reshape(-1)
    sums = torch.zeros(geometry.num_blocks, dtype=torch.float64).index_add_(0, idx, t.pow(2).reshape(-1))
    counts = torch.bincount(idx, minlength=geometry.num_blocks).to(torch.float64)
    torch.testing.assert_close(means, sums / counts, rtol=1e-12, atol=0)


# ---------------------------------------------------------------------------
# check_geometry


@pytest.mark.parametrize(
    "shape, geometry",
    [
        ((4, 3), Geometry(0, ((4, 1),))),
        ((4, 3), Geometry(1, ((3, 3),))),
        ((4, 3), Geometry(-1, ((12, 1),))),
        ((4, 3), Geometry(0, ((2, 2), (2, 1)))),
        ((), Geometry(-1, ((1, 1),))),
        ((5, 2, 3, 3), Geometry(0, ((5, 1),))),
    ],
)
def test_check_geometry_accepts_valid(shape, geometry):
    check_geometry(shape, geometry)


@pytest.mark.parametrize(
    "shape, geometry, match",
    [
        ((4, 3), Geometry(2, ((4, 1),)), r"axis: 2"),
        ((4, 3), Geometry(-2, ((4, 1),)), r"axis: -2"),
        ((4,), Geometry(1, ((4, 1),)), r"axis 1 does not exist .*\[4\]"),
        ((4, 3), Geometry(0, ()), r"no segments"),
        ((4, 3), Geometry(0, ((3, 1),)), r"cover 3 indices .* has 4"),
        ((4, 3), Geometry(0, ((2, 1), (3, 1))), r"cover 5 indices"),
        ((4, 3), Geometry(-1, ((11, 1),)), r"cover 11 indices"),
        ((4, 3), Geometry(0, ((4, 3),)), r"size 4 is not divisible into blocks of 3"),
        ((4, 3), Geometry(0, ((4, 0),)), r"blocks of 0"),
        ((4, 3), Geometry(0, ((4, -2),)), r"blocks of -2"),
    ],
)
def test_check_geometry_errors(shape, geometry, match):
    with pytest.raises(ValueError, match=match):
        check_geometry(shape, geometry)


def test_check_geometry_rejects_several_segments_on_flattened_axis():
    """Axis -1 has exactly one segment (block_views/block_index/PlanEntry.kind unpack one).

    A geometry such as ``(-1, ((4, 1), (8, 8)))`` covers a [4, 3] tensor, so the
    size check alone passes; it must still be rejected here, not fail later
    with an unpacking error inside ``block_views``.
    """
    geometry = Geometry(-1, ((4, 1), (8, 8)))
    with pytest.raises(ValueError, match="segment"):
        check_geometry((4, 3), geometry)


# ---------------------------------------------------------------------------
# the coordinate -> block id arithmetic (one place: coordinate_block_ids)


def test_coordinate_block_ids_golden_and_every_range_is_a_slice_of_the_whole():
    """A fused QKV row layout: 2 heads of 3 rows, 1 kv head of 3 rows, 3 single rows."""
    from blockopt.kernels.blocks import coordinate_block_ids, coordinate_table

    geometry = Geometry(0, ((6, 3), (3, 3), (3, 1)))
    whole = coordinate_block_ids(geometry)
    assert whole.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 4, 5] and whole.dtype == torch.int64
    assert torch.equal(coordinate_table(geometry), whole)
    for a in range(13):
        for b in range(a, 13):
            assert torch.equal(coordinate_block_ids(geometry, a, b), whole[a:b]), (a, b)


def test_block_of_and_block_coordinates_invert_each_other():
    from blockopt.kernels.blocks import block_coordinates, block_of, coordinate_block_ids

    for geometry in (Geometry(0, ((6, 3), (3, 3), (3, 1))), Geometry(1, ((8, 4),)), Geometry(2, ((12, 2),))):
        ids = coordinate_block_ids(geometry)
        assert [block_of(geometry, i) for i in range(ids.numel())] == ids.tolist()
        for block in range(geometry.num_blocks):
            assert torch.equal(block_coordinates(geometry, block), (ids == block).nonzero().reshape(-1))
        with pytest.raises(IndexError):
            block_of(geometry, ids.numel())
        with pytest.raises(IndexError):
            block_coordinates(geometry, geometry.num_blocks)
