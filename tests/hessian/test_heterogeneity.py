"""Block heterogeneity (``blockopt.hessian.heterogeneity``): the JS distance, and heterogeneity of
quadratic models whose Hessian is ``blockdiag(A_b)`` with spectra chosen by the test."""

from __future__ import annotations

import math

import pytest
import torch
from hessian_helpers import Quadratic, known_spectrum, one_thread, quad_loss  # noqa: F401 - fixture
from torch import nn

import blockopt
from blockopt.hessian import (
    HessianInputError,
    HessianOperator,
    SpectralQuadrature,
    common_grid,
    heterogeneity,
    js_distance,
    js_matrix,
    tensor_blocks,
)
from blockopt.hessian.heterogeneity import mean_offdiagonal


def test_js_distance_values():
    p = torch.tensor([1.0, 0.0, 0.0])
    q = torch.tensor([0.5, 0.5, 0.0])
    assert js_distance(p, p) == 0.0
    assert js_distance(p, torch.tensor([0.0, 0.0, 3.0])) == pytest.approx(1.0)  # disjoint supports
    # H(M) - (H(P) + H(Q)) / 2 with M = (0.75, 0.25): 0.811278 - 0.5 = 0.311278 bits
    m = -(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25))
    assert js_distance(p, q) == pytest.approx(math.sqrt(m - 0.5), abs=1e-12)
    assert js_distance(p, q) == js_distance(q, p)
    assert js_distance(2 * p, q) == pytest.approx(js_distance(p, q))  # scale free
    J = js_matrix(torch.stack([p, q, torch.tensor([0.0, 0.0, 1.0])]))
    assert torch.equal(J, J.T) and torch.all(J.diagonal() == 0)
    assert mean_offdiagonal(J) == pytest.approx((J[0, 1] + J[0, 2] + J[1, 2]).item() / 3)


def _block_mats(scales: list[float], n: int = 64, seed: int = 0) -> list[torch.Tensor]:
    """Blocks whose spectra share one shape (a log-uniform bulk and a few outliers), times ``scales``."""
    g = torch.Generator().manual_seed(seed)
    mats = []
    for i, s in enumerate(scales):
        bulk = torch.logspace(-3, 0, n - 3, dtype=torch.float64) * (1 + 0.05 * torch.rand(n - 3, generator=g))
        eigs = torch.cat([bulk, torch.tensor([5.0, 3.0, -0.5], dtype=torch.float64)]) * s
        mats.append(known_spectrum(eigs, seed=seed + i))
    return mats


def _het(mats, **kw):
    model = Quadratic(mats)
    op = HessianOperator(model, None, quad_loss)
    return op, heterogeneity(op, num_probes=4, num_steps=25, deflate=4, **kw)


def test_same_spectra_are_homogeneous_and_scaled_ones_are_not():
    _, same = _het(_block_mats([1, 1, 1, 1]))
    _, scaled = _het(_block_mats([1, 1e2, 1e-2, 1e4]))
    assert same.heterogeneity < 0.1, same.heterogeneity
    assert scaled.heterogeneity > 0.8, scaled.heterogeneity
    assert same.noise_floor is not None and same.noise_floor < 0.1
    # per-block top eigenvalues: the deflated (largest magnitude) ones, exact
    top = scaled.top["w.1"]["top_eigenvalues"]
    assert top[:2] == pytest.approx([500.0, 300.0], rel=1e-6)
    s = scaled.summary()
    assert s["heterogeneity"] == scaled.heterogeneity and s["weighting"] == "curvature"
    assert [b["name"] for b in s["blocks"]] == ["w.0", "w.1", "w.2", "w.3"]


def test_slq_heterogeneity_matches_the_exact_spectra():
    mats = _block_mats([1, 3, 30, 0.3, 1e3])
    _, res = _het(mats)
    exact = [SpectralQuadrature([e], [torch.full_like(e, 1 / e.numel())], e.numel())
             for e in (torch.linalg.eigvalsh(A) for A in mats)]
    dens = torch.stack([q.density(res.grid, "curvature") for q in exact])
    exact_het = mean_offdiagonal(js_matrix(dens))
    assert abs(res.heterogeneity - exact_het) < 0.05, (res.heterogeneity, exact_het)
    assert 0.2 < exact_het < 0.95  # a case in between, not a saturated one


def test_count_weighting_is_available_and_grid_is_common():
    _, res = _het(_block_mats([1, 10]), weighting="count", scale="linear")
    assert res.weighting == "count" and res.grid.scale == "linear"
    assert res.densities.shape == (2, res.grid.points.numel())
    for d in res.densities:
        assert abs(res.grid.integrate(d) - 1) < 0.02


class _WithMHA(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True).double()
        self.norm = nn.LayerNorm(8).double()
        self.head = nn.Linear(8, 3).double()

    def forward(self, x):
        h, _ = self.attn(x, x, x, need_weights=False)
        return self.head(self.norm(h).mean(1))


def test_blocks_from_the_plan_split_fused_qkv_and_skip_1d_tensors():
    torch.manual_seed(0)
    model = _WithMHA()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 5, 8, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (4,), generator=g)
    op = HessianOperator(model, (x, y), lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1]))
    plan = blockopt.partition(model, warn=False)
    blocks = tensor_blocks(op, plan, min_dim=2)
    names = [b.name for b in blocks]
    assert names == ["attn.in_proj_weight[query]", "attn.in_proj_weight[key]", "attn.in_proj_weight[value]",
                     "attn.out_proj.weight", "head.weight"]
    q = blocks[0]
    assert q.index.tolist() == list(range(64))  # rows 0-7 of the [24, 8] fused weight
    assert blocks[2].index.tolist() == list(range(128, 192))
    assert [b.role for b in blocks] == ["query", "key", "value", "attn_out", "mlp"]
    # 1-D tensors come back with min_dim=1
    assert "norm.weight" in [b.name for b in tensor_blocks(op, plan, min_dim=1)]
    res = heterogeneity(op, plan=plan, num_probes=2, num_steps=10, deflate=2)
    assert res.names == names and res.js.shape == (5, 5)


def test_too_few_blocks_is_an_error():
    op = HessianOperator(Quadratic(_block_mats([1])), None, quad_loss)
    with pytest.raises(HessianInputError, match="at least two blocks"):
        heterogeneity(op)
    with pytest.raises(HessianInputError, match="at least two"):
        heterogeneity(op, blocks=[])
    q = SpectralQuadrature([torch.ones(2, dtype=torch.float64)], [torch.full((2,), 0.5, dtype=torch.float64)], 2)
    with pytest.raises(HessianInputError, match="weighting: 'bogus'"):
        q.density(common_grid([q]), "bogus")


def test_whole_model_slq_and_top_eigenvalues_without_deflation():
    mats = [known_spectrum(torch.full((64,), 1.0, dtype=torch.float64), seed=1),
            known_spectrum(torch.full((36,), 100.0, dtype=torch.float64), seed=2)]
    op = HessianOperator(Quadratic(mats), None, quad_loss)
    assert op.numel == 100
    from blockopt.hessian import slq

    q = slq(op, num_probes=20, num_steps=10, generator=torch.Generator().manual_seed(0))  # the whole Hessian
    assert abs(q.mass(50, 150) - 0.36) < 0.05 and abs(q.mass(0.5, 1.5) - 0.64) < 0.05
    res = heterogeneity(op, num_probes=2, num_steps=10, deflate=0, top_k=2)
    assert res.top["w.1"]["top_eigenvalues"] == pytest.approx([100.0, 100.0], rel=1e-6)
    assert res.heterogeneity > 0.9  # two decades apart: disjoint on the log axis
