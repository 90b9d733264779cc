"""Dense Hessians, partition labels and scores, heatmaps (``blockopt.hessian.dense``)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import max_rel_diff
from hessian_helpers import HVP_TOL, ce_loss, full_hessian, lm_loss, one_thread, tiny_lm, tiny_mlp  # noqa: F401

import blockopt
from blockopt.hessian import (
    HessianInputError,
    HessianOperator,
    compare_partitions,
    dense_hessian,
    partition_labels,
    partition_score,
    plan_slice,
    plot_heatmap,
    standard_partitions,
)
from blockopt.kernels.blocks import Geometry, block_index


def test_dense_hessian_equals_autograd_including_slices():
    model, batch = tiny_mlp()
    op = HessianOperator(model, batch, ce_loss)
    H = full_hessian(model, ce_loss, batch, op.names)
    assert max_rel_diff(dense_hessian(op), H) < HVP_TOL
    n0 = op.sizes[0]
    assert max_rel_diff(dense_hessian(op, "0.weight"), H[:n0, :n0]) < HVP_TOL
    idx = torch.tensor([0, 3, 7, 12, 29])
    assert max_rel_diff(dense_hessian(op, "0.weight", idx), H[idx][:, idx]) < HVP_TOL
    Hs = dense_hessian(op, "0.weight", symmetrize=True)
    assert torch.equal(Hs, Hs.T)
    with pytest.raises(HessianInputError, match="max_numel=10"):
        dense_hessian(op, "0.weight", max_numel=10)


def test_partition_score_definition():
    g = torch.Generator().manual_seed(0)
    blocks = [torch.randn(3, 3, generator=g, dtype=torch.float64) for _ in range(3)]
    H = torch.block_diag(*blocks)
    labels = torch.arange(3).repeat_interleave(3)
    assert partition_score(H, labels) == pytest.approx(1.0)
    assert partition_score(H, torch.zeros(9, dtype=torch.long)) == 1.0  # one block: trivially 1
    off = H + 0.1 * torch.ones(9, 9, dtype=torch.float64)
    inside = sum(float((off[3 * i:3 * i + 3, 3 * i:3 * i + 3] ** 2).sum()) for i in range(3))
    assert partition_score(off, labels) == pytest.approx(math.sqrt(inside / float((off ** 2).sum())))
    diag = partition_score(off, torch.arange(9))
    assert diag == pytest.approx(float(off.diagonal().norm() / off.norm()))
    # random partitions with the same sizes score far lower on a block-diagonal matrix
    s = compare_partitions(H, {"true": labels}, trials=16)[0]
    assert s.score == pytest.approx(1.0) and s.random < 0.8 and s.lift == pytest.approx(1.0)
    with pytest.raises(HessianInputError, match="4 labels for a Hessian of shape"):
        partition_score(H, torch.zeros(4, dtype=torch.long))


def test_partition_labels_follow_the_geometry():
    shape = (6, 4)
    assert partition_labels(shape, "tensor").unique().tolist() == [0]
    rows = partition_labels(shape, "row").view(shape)
    assert torch.equal(rows, torch.arange(6)[:, None].expand(6, 4))
    heads = partition_labels(shape, "head", head_dim=3).view(shape)
    assert torch.equal(heads, (torch.arange(6) // 3)[:, None].expand(6, 4))
    cols = partition_labels(shape, "columns", num_blocks=2).view(shape)
    assert torch.equal(cols, (torch.arange(4) // 2)[None, :].expand(6, 4))
    geom = Geometry(0, ((2, 2), (4, 1)))
    assert torch.equal(partition_labels(shape, geom), block_index(shape, geom).reshape(-1))
    idx = torch.tensor([0, 5, 23])
    assert partition_labels(shape, "row", index=idx).tolist() == [0, 1, 5]
    with pytest.raises(HessianInputError, match="head_dim: 4"):
        partition_labels(shape, "head", head_dim=4)
    with pytest.raises(HessianInputError, match="partition kind: 'heads'"):
        partition_labels(shape, "heads")


def test_query_hessian_is_near_block_diagonal_by_head():
    """The Adam-mini finding on a float64 decoder: 2 heads of 8, query weight [16, 16]."""
    model, batch = tiny_lm(d_model=16, n_heads=2, batch=4, seq=8)
    plan = blockopt.partition(model, warn=False)
    name = "blocks.0.attn.q_proj.weight"
    op = HessianOperator(model, batch, lm_loss, params=[name])
    H = dense_hessian(op, name, symmetrize=True)
    parts = standard_partitions((16, 16), plan[name])
    assert set(parts) == {"per-tensor", "plan", "per-row", "per-head", "input-groups"}
    assert torch.equal(parts["plan"], parts["per-head"])  # the engine's plan is per head for queries
    scores = {s.name: s for s in compare_partitions(H, parts, trials=16)}
    head, row, cols = scores["per-head"], scores["per-row"], scores["input-groups"]
    assert scores["per-tensor"].score == 1.0
    assert head.num_blocks == cols.num_blocks == 2
    assert head.score > 0.95 and head.lift > 0.8  # near block diagonal by head
    assert head.score > cols.score + 0.2  # a structured partition of the same count and sizes does not
    assert head.score > row.score + 0.2  # the rows of one head are strongly coupled


def test_plan_slice_takes_whole_blocks_and_heatmap_is_written(tmp_path):
    model, _ = tiny_lm(d_model=16, n_heads=2)
    plan = blockopt.partition(model, warn=False)
    e = plan["blocks.0.attn.q_proj.weight"]  # 2 heads of 8 rows x 16 columns = 128 entries each
    assert plan_slice(e.shape, e, 256) is None
    idx = plan_slice(e.shape, e, 200)
    assert idx.tolist() == list(range(128))
    assert plan_slice((10, 10), None, 35).tolist() == list(range(30))
    H = torch.randn(12, 12, dtype=torch.float64)
    labels = torch.tensor([1, 0] * 6)  # blocks interleaved: the plot sorts them together
    out = plot_heatmap(H @ H.T, tmp_path / "h.png", labels=labels, title="t")
    assert out.exists() and out.stat().st_size > 1000
    with pytest.raises(HessianInputError, match="3 labels for a Hessian of size 12"):
        plot_heatmap(H, tmp_path / "x.png", labels=torch.zeros(3, dtype=torch.long))
