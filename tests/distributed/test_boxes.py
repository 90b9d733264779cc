"""Tensor-parallel box layouts against the unsharded ground truth, the ranks simulated in one process.

A grid of ranks splits a tensor along one or two dimensions (torch.chunk per dimension, as TP and
FSDP2 + TP do); each simulated rank sums g**2 over its box; the full vectors are summed as the
all_reduce over each mesh dimension would; every rank's block means must then equal the means of
the whole tensor (``block_index``), and its expanded denominators the whole tensor's, sliced. The
full second-moment vector gathered with MAX must be the whole one.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from blockopt.distributed.boxes import BoxInfo, box_layout, global_flat_index, local_box_state
from blockopt.kernels.blocks import Geometry, block_index, check_geometry

CASES = [
    ("rows", (12, 10), Geometry(0, ((12, 1),))),
    ("heads of 4 rows", (12, 10), Geometry(0, ((12, 4),))),
    ("heads of 6 rows (split at 4 ranks)", (12, 10), Geometry(0, ((12, 6),))),
    ("fused heads and rows", (16, 6), Geometry(0, ((8, 4), (8, 1)))),
    ("columns", (6, 12), Geometry(1, ((12, 1),))),
    ("column heads", (6, 12), Geometry(1, ((12, 3),))),
    ("whole tensor", (8, 6), Geometry(-1, ((48, 48),))),
    ("per element", (8, 6), Geometry(-1, ((48, 1),))),
    ("stacked [E, in, out] by dim 0", (4, 3, 5), Geometry(2, ((20, 1),))),
]
#: (sizes of the mesh dimensions, which tensor dim each one shards)
GRIDS = [((2,), (0,)), ((2,), (1,)), ((4,), (1,)), ((3,), (1,)), ((2, 2), (0, 0)), ((2, 2), (0, 1)),
         ((2, 3), (1, 0))]


def _chunk(n: int, parts: int, k: int) -> tuple[int, int]:
    c = -(-n // parts) if n else 0
    a = min(k * c, n)
    return a, min(a + c, n)


def _boxes(shape, sizes, dims):
    """Every rank's box: each mesh dimension chunks its tensor dim within the ranges of the ones before."""
    for coord in itertools.product(*[range(s) for s in sizes]):
        box = [(0, n) for n in shape]
        for k, s, d in zip(coord, sizes, dims):
            a, b = box[d]
            lo, hi = _chunk(b - a, s, k)
            box[d] = (a + lo, a + hi)
        yield coord, tuple(box)


def _cases():
    for (cid, shape, geometry), (sizes, dims) in itertools.product(CASES, GRIDS):
        if geometry.axis == 2 and any(d != 0 for d in dims):
            continue  # stacked experts: dim 0 only (the others are refused, see below)
        if max(dims) < len(shape):
            yield pytest.param(shape, geometry, sizes, dims, id=f"{cid}-{sizes}-dims{dims}")


@pytest.mark.parametrize("shape,geometry,sizes,dims", list(_cases()))
def test_box_block_means_and_denominators_equal_the_whole_tensor(shape, geometry, sizes, dims):
    check_geometry(shape, geometry)
    g = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ids = block_index(shape, geometry)
    nb = geometry.num_blocks
    flat_ids = ids.reshape(-1)
    want_sum = torch.zeros(nb, dtype=torch.float64).index_add_(0, flat_ids, g.reshape(-1) ** 2)
    want_mean = want_sum / torch.bincount(flat_ids, minlength=nb).double()
    denom = torch.rand(nb, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) + 0.5
    elementwise = geometry.axis == -1 and geometry.segments[0][1] == 1
    ranks = []
    total = None
    for _, box in _boxes(shape, sizes, dims):
        info = BoxInfo(box_layout(shape, geometry, box, "w"), "cpu", groups=())
        local = g[tuple(slice(a, b) for a, b in box)]
        s = info.local_sums(local)
        if elementwise:
            assert s is None
        else:
            full = torch.zeros(nb, dtype=torch.float64).index_copy_(0, info.gids, s)
            total = full if total is None else total + full  # all_reduce over every sharded mesh dimension
        ranks.append((info, box))
    for info, box in ranks:
        sl = tuple(slice(a, b) for a, b in box)
        if not elementwise:
            torch.testing.assert_close(total[info.gids] / info.counts, want_mean[info.gids], rtol=1e-12, atol=0)
            got = info.expand(denom[info.gids]).expand(info.local_shape)
            torch.testing.assert_close(got, denom[ids][sl], rtol=0, atol=0)
        else:  # per element: the local elements, in order, are the blocks
            assert torch.equal(info.gids, global_flat_index(box, shape).reshape(-1))
            assert torch.equal(info.gids, torch.arange(g.numel()).view(shape)[sl].reshape(-1))
    # the full vector from every rank's touched values, MAX over ranks (values >= 0): the whole vector
    v = torch.rand(nb if not elementwise else g.numel(), dtype=torch.float64)
    gathered = torch.zeros_like(v)
    for info, _ in ranks:
        part = torch.zeros_like(v).index_copy_(0, info.gids, local_box_state(v, info))
        gathered = torch.maximum(gathered, part)
    assert torch.equal(gathered, v)


def test_blocks_a_box_cannot_take_are_refused_by_name():
    with pytest.raises(ValueError, match=r"parameter 'moe\.w'.*stacked \[E, in, out\].*along dim 0 only"):
        box_layout((4, 3, 5), Geometry(2, ((20, 1),)), ((0, 4), (0, 3), (0, 2)), "moe.w")
    with pytest.raises(ValueError, match=r"parameter 'w': its blocks are runs of 8 flat elements"):
        box_layout((8, 6), Geometry(-1, ((48, 8),)), ((0, 8), (0, 3)), "w")


def test_tensor_parallel_refuses_features_that_do_not_divide():
    from blockopt.distributed.launch import tensor_parallel
    from blockopt.models import build_model

    class Mesh:  # what tensor_parallel reads before it splits anything
        def size(self) -> int:
            return 3

    model = build_model("llama-tiny", n_layers=1, d_model=32, n_heads=4, n_kv_heads=2, vocab_size=67)
    with pytest.raises(ValueError, match=r"Invalid tensor-parallel degree 3 for Linear 'attn\.q_proj': its "
                                         r"out_features 32 does not divide by it"):
        tensor_parallel(model, Mesh())
