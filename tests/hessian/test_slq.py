"""Spectral densities by SLQ and trace estimators (``blockopt.hessian.slq``) on known spectra."""

from __future__ import annotations

import math

import pytest
import torch
from hessian_helpers import known_spectrum, one_thread  # noqa: F401 - fixture

from blockopt.hessian import HessianInputError, common_grid, hutchinson, hutchpp, slq


def _two_clusters(n: int = 400, frac_high: float = 0.3, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    k = int(n * frac_high)
    high = 10.0 + 0.2 * torch.randn(k, generator=g, dtype=torch.float64)
    low = 1.0 + 0.2 * torch.randn(n - k, generator=g, dtype=torch.float64)
    return torch.cat([high, low])


@pytest.mark.parametrize("scale", ["linear", "symlog"])
@pytest.mark.parametrize("weighting", ["count", "curvature"])
def test_densities_integrate_to_one(scale, weighting):
    eigs = torch.cat([torch.logspace(-3, 1, 150, dtype=torch.float64), -torch.logspace(-2, 0, 50, dtype=torch.float64)])
    A = known_spectrum(eigs, seed=1)
    q = slq(A, num_probes=3, num_steps=25, generator=torch.Generator().manual_seed(0))
    for w in q.weights:
        assert abs(float(w.sum()) - 1) < 1e-10  # Gauss quadrature weights of a unit probe
    grid = common_grid([q], scale=scale)
    mass = grid.integrate(q.density(grid, weighting))
    assert abs(mass - 1) < 0.02, mass


def test_two_cluster_spectrum_gets_the_right_mass():
    eigs = _two_clusters(frac_high=0.3)
    A = known_spectrum(eigs, seed=2)
    q = slq(A, num_probes=20, num_steps=30, generator=torch.Generator().manual_seed(1))
    assert abs(q.mass(5, 15) - 0.3) < 0.03
    assert abs(q.mass(-5, 5) - 0.7) < 0.03
    # the smoothed density says the same, on both axes
    for scale in ("linear", "symlog"):
        grid = common_grid([q], scale=scale, sigma=0.2 if scale == "linear" else 0.05)
        d = q.density(grid)
        x = grid.inverse(grid.points)
        high = float(torch.trapezoid(d * (x > 5), grid.points))
        assert abs(high - 0.3) < 0.03, (scale, high)
    # and a skewed split is told apart from it
    q2 = slq(known_spectrum(_two_clusters(frac_high=0.6), seed=3), num_probes=20, num_steps=30,
             generator=torch.Generator().manual_seed(1))
    assert abs(q2.mass(5, 15) - 0.6) < 0.03


def test_moments_and_exact_nodes_when_steps_reach_the_dimension():
    eigs = torch.linspace(-1, 3, 40, dtype=torch.float64)
    A = known_spectrum(eigs, seed=4)
    q = slq(A, num_probes=2, num_steps=40, generator=torch.Generator().manual_seed(0))
    for nodes in q.nodes:
        assert torch.allclose(nodes, eigs, atol=1e-9)
    big = known_spectrum(torch.linspace(0, 2, 500, dtype=torch.float64), seed=5)
    q = slq(big, num_probes=30, num_steps=20, generator=torch.Generator().manual_seed(2))
    assert abs(q.moment(1) - 1.0) < 0.03  # tr(A)/n
    assert abs(q.moment(2) - float((torch.linspace(0, 2, 500) ** 2).mean())) < 0.05


def test_deflation_enters_outliers_exactly_and_reduces_variance():
    eigs = torch.cat([torch.tensor([100.0, 60.0, -40.0], dtype=torch.float64),
                      torch.linspace(0.01, 1.0, 297, dtype=torch.float64)])
    A = known_spectrum(eigs, seed=6)
    q = slq(A, num_probes=4, num_steps=20, deflate=3, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(q.deflated, torch.tensor([100.0, 60.0, -40.0], dtype=torch.float64), rtol=1e-8)
    for nodes, w in zip(q.nodes, q.weights):
        assert abs(float(w.sum()) - 1) < 1e-10
        assert torch.allclose(w[:3], torch.full((3,), 1 / 300, dtype=torch.float64))
        assert float(nodes[3:].max()) < 1.0 + 1e-6  # the probes saw only the bulk
    # share of the curvature held by the outliers (exact: 200 / (200 + sum of the bulk))
    exact = 200.0 / float(eigs.abs().sum())

    def share(deflate: int, seed: int) -> float:
        qq = slq(A, num_probes=2, num_steps=20, deflate=deflate, generator=torch.Generator().manual_seed(seed))
        c = qq.curvature_weighted()
        return sum(float(w[x.abs() > 30].sum()) for x, w in zip(c.nodes, c.weights)) / c.num_probes

    plain = torch.tensor([share(0, s) for s in range(8)])
    defl = torch.tensor([share(3, s) for s in range(8)])
    assert (defl - exact).abs().max() < 0.03
    assert float(plain.std()) > 5 * float(defl.std())  # about 0.13 vs 0.01


def test_trace_estimators():
    g = torch.Generator().manual_seed(0)
    eigs = 1.0 / torch.arange(1, 301, dtype=torch.float64) ** 2  # fast decay: Hutch++'s case
    A = known_spectrum(eigs, seed=7)
    tr = float(eigs.sum())
    h = hutchinson(A, 60, generator=g)
    assert h.matvecs == 60 and abs(h.value - tr) < 4 * h.std_error
    pp = hutchpp(A, 60, generator=g)
    assert pp.matvecs == 60
    assert abs(pp.value - tr) / tr < 1e-2  # about 2e-3; Hutchinson with the same budget: about 1e-1
    assert abs(pp.value - tr) < 0.2 * abs(h.value - tr)
    low_rank = known_spectrum(torch.cat([torch.arange(1.0, 11.0), torch.zeros(190)]).double(), seed=8)
    assert math.isclose(hutchpp(low_rank, 33, generator=g).value, 55.0, rel_tol=1e-9)


def test_bad_arguments():
    A = known_spectrum(torch.arange(1.0, 5.0))
    with pytest.raises(HessianInputError, match="num_probes: 0"):
        slq(A, num_probes=0)
    with pytest.raises(HessianInputError, match="scale: 'log'"):
        common_grid([slq(A, num_steps=2)], scale="log")
    q = slq(A, num_steps=2)
    with pytest.raises(HessianInputError, match="weighting: 'mass'"):
        q.density(common_grid([q]), "mass")
