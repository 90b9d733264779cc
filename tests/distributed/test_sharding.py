"""Shard layouts against the unsharded ground truth, with the ranks simulated in one process.

For every geometry and world size: each simulated rank sums g**2 over its
rows; the shared blocks are packed into the buffer layout, summed as an
all_reduce would, and unpacked; then every rank's block means must equal
the means computed on the whole tensor with ``block_index`` (the index map the
reference kernel trusts). Denominators expanded on each shard must equal the
whole tensor's, sliced.
"""

from __future__ import annotations

import pytest
import torch

from blockopt.distributed.sharding import ShardInfo, chunk_rows, expand_denominator, local_block_sq_sums, shard_layout
from blockopt.kernels.blocks import Geometry, block_index, check_geometry

CASES = [
    # (id, shape, geometry)
    ("rows of an odd dim 0", (67, 5), Geometry(0, ((67, 1),))),
    ("6 heads of 4 rows", (24, 6), Geometry(0, ((24, 4),))),
    ("one head of 4 rows", (4, 6), Geometry(0, ((4, 4),))),
    ("fused q/k/v: heads, heads, rows", (20, 3), Geometry(0, ((12, 4), (4, 4), (4, 1)))),
    ("fused with a one-block value", (20, 3), Geometry(0, ((12, 4), (4, 4), (4, 4)))),
    ("3-D rows", (9, 2, 3), Geometry(0, ((9, 3),))),
    ("columns", (7, 10), Geometry(1, ((10, 1),))),
    ("column heads", (7, 12), Geometry(1, ((12, 4),))),
    ("3-D columns", (5, 6, 2), Geometry(1, ((6, 2),))),
    ("per element", (11, 3), Geometry(-1, ((33, 1),))),
    ("whole tensor", (13, 4), Geometry(-1, ((52, 52),))),
    ("1-D whole tensor", (24,), Geometry(-1, ((24, 24),))),
    ("1-D per element", (9,), Geometry(-1, ((9, 1),))),
    ("flat blocks across rows", (10, 3), Geometry(-1, ((30, 5),))),
    ("flat blocks within rows", (8, 6), Geometry(-1, ((48, 3),))),
    ("flat blocks of two rows", (8, 3), Geometry(-1, ((24, 6),))),
    ("stacked experts [E, out, in]: per expert and row", (5, 4, 3), Geometry(-1, ((60, 3),))),
    ("stacked experts [E, in, out]: per expert and column", (5, 3, 4), Geometry(2, ((20, 1),))),
    ("stacked columns in pairs, two segments", (5, 3, 4), Geometry(2, ((8, 2), (12, 1)))),
]
WORLDS = [1, 2, 3, 4, 7]


def _simulate(shape, geometry, world, g):
    """Per-rank (info, block sums after the simulated all_reduce)."""
    infos = [ShardInfo(shard_layout(shape, geometry, k, world)) for k in range(world)]
    n_shared = {info.layout.num_shared for info in infos}
    assert len(n_shared) == 1, "every rank must derive the same buffer length"
    total = torch.zeros(n_shared.pop(), dtype=g.dtype)
    sums = []
    for info in infos:
        r0, r1 = info.layout.rows
        s = local_block_sq_sums(g[r0:r1], info)
        assert s.shape == (info.layout.num_local_blocks,)
        buf = torch.zeros_like(total)
        buf[info.shared_pos] = s[info.shared_local]
        total += buf  # what all_reduce(SUM) computes
        sums.append(s)
    for info, s in zip(infos, sums):
        s[info.shared_local] = total[info.shared_pos]
    return infos, sums


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("shape,geometry", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_block_means_of_shards_equal_the_unsharded_means(shape, geometry, world):
    check_geometry(shape, geometry)
    g = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(world))
    ids = block_index(shape, geometry).reshape(-1)
    nb = geometry.num_blocks
    want_sum = torch.zeros(nb, dtype=torch.float64).index_add_(0, ids, g.reshape(-1) ** 2)
    want_count = torch.bincount(ids, minlength=nb).double()
    infos, sums = _simulate(shape, geometry, world, g)
    for info, s in zip(infos, sums):
        lo, hi = info.layout.blocks
        torch.testing.assert_close(s / info.counts, (want_sum / want_count)[lo:hi], rtol=1e-12, atol=0)
        torch.testing.assert_close(info.counts, want_count[lo:hi])


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("shape,geometry", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_layouts_cover_every_block_once_and_agree_across_ranks(shape, geometry, world):
    layouts = [shard_layout(shape, geometry, k, world) for k in range(world)]
    nb = geometry.num_blocks
    # rows: torch.chunk
    chunks = torch.arange(shape[0]).chunk(world)
    for k, lay in enumerate(layouts):
        want = (int(chunks[k][0]), int(chunks[k][-1]) + 1) if k < len(chunks) and len(chunks[k]) else None
        assert lay.rows == want or (want is None and lay.rows[0] == lay.rows[1]), (k, lay.rows, want)
    # owners: each block written by exactly one rank when the full vector is assembled
    owned = torch.zeros(nb, dtype=torch.int64)
    for lay in layouts:
        a, b = lay.owned
        assert lay.blocks[0] <= a <= b <= lay.blocks[1]
        owned[a:b] += 1
    assert owned.tolist() == [1] * nb
    # shared blocks: the same on every rank, and exactly the blocks touched by two ranks or more
    assert len({lay.shared for lay in layouts}) == 1
    touched = torch.zeros(nb, dtype=torch.int64)
    for lay in layouts:
        touched[lay.blocks[0]:lay.blocks[1]] += 1
    shared = torch.zeros(nb, dtype=torch.bool)
    for a, b in layouts[0].shared:
        shared[a:b] = True
    assert torch.equal(shared, touched >= 2)


@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("shape,geometry", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_expanded_denominators_equal_the_unsharded_ones(shape, geometry, world):
    denom = torch.rand(geometry.num_blocks, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) + 0.5
    full = denom[block_index(shape, geometry)]  # [shape]
    for k in range(world):
        info = ShardInfo(shard_layout(shape, geometry, k, world))
        r0, r1 = info.layout.rows
        lo, hi = info.layout.blocks
        local = full[r0:r1]
        if local.numel() == 0:
            continue
        got = expand_denominator(denom[lo:hi], info).expand(local.shape)
        assert torch.equal(got, local), k


def test_heads_split_across_four_ranks_share_boundary_blocks():
    """6 heads of 4 rows over 4 ranks (6 rows each): heads 1 and 4 straddle ranks 0|1 and 2|3."""
    layouts = [shard_layout((24, 8), Geometry(0, ((24, 4),)), k, 4) for k in range(4)]
    assert [lay.rows for lay in layouts] == [(0, 6), (6, 12), (12, 18), (18, 24)]
    assert [lay.blocks for lay in layouts] == [(0, 2), (1, 3), (3, 5), (4, 6)]
    assert layouts[0].shared == ((1, 2), (4, 5))
    assert [lay.owned for lay in layouts] == [(0, 2), (2, 3), (3, 5), (5, 6)]


def test_short_dim_0_leaves_the_last_ranks_empty():
    assert [chunk_rows(5, 4, k) for k in range(4)] == [(0, 2), (2, 4), (4, 5), (5, 5)]
    lay = shard_layout((5, 3), Geometry(-1, ((15, 15),)), 3, 4)
    assert lay.num_local_blocks == 0 and lay.owned == (0, 0) and lay.shared == ((0, 1),)
    info = ShardInfo(lay)
    assert local_block_sq_sums(torch.zeros(0, 3), info).shape == (0,)


def test_bad_rank_is_rejected():
    with pytest.raises(ValueError, match="Invalid rank 4 for world size 4"):
        chunk_rows(8, 4, 4)
