"""Lanczos (``blockopt.hessian.lanczos``) on matrices with known spectra."""

from __future__ import annotations

import pytest
import torch
from hessian_helpers import known_spectrum, one_thread  # noqa: F401 - fixture

from blockopt.hessian import HessianInputError, MatrixOperator, lanczos, top_eigenvalues

EIG_REL = 1e-6  # acceptance: extreme eigenvalues to 1e-6 relative


def _spectrum() -> torch.Tensor:
    # a bulk in [0.1, 10], two large outliers, one negative outlier
    bulk = torch.linspace(0.1, 10.0, 297, dtype=torch.float64)
    return torch.cat([bulk, torch.tensor([500.0, 300.0, -50.0], dtype=torch.float64)])


@pytest.mark.parametrize("which, k, expected", [
    ("largest", 3, [500.0, 300.0, 10.0]),
    ("smallest", 2, [-50.0, 0.1]),
    ("magnitude", 3, [500.0, 300.0, -50.0]),
])
def test_extreme_eigenvalues_of_a_known_spectrum(which, k, expected):
    A = known_spectrum(_spectrum(), seed=1)
    r = top_eigenvalues(A, k, which=which, max_steps=150, tol=1e-10, generator=torch.Generator().manual_seed(0))
    assert r.converged
    exp = torch.tensor(expected, dtype=torch.float64)
    assert ((r.eigenvalues - exp).abs() / exp.abs()).max() < EIG_REL, r.eigenvalues
    assert (r.residuals < 1e-6 * exp.abs()).all()


def test_eigenvectors_and_residual_bounds():
    A = known_spectrum(_spectrum(), seed=2)
    r = top_eigenvalues(A, 2, max_steps=80, tol=1e-12, generator=torch.Generator().manual_seed(1),
                        return_vectors=True)
    X = r.eigenvectors
    assert X.shape == (300, 2)
    res = (A @ X - X * r.eigenvalues).norm(dim=0)
    assert (res < 1e-8 * r.eigenvalues.abs()).all()
    assert torch.allclose(X.T @ X, torch.eye(2, dtype=torch.float64), atol=1e-10)


def test_full_reorthogonalisation_keeps_the_basis_orthonormal():
    # many well separated outliers converge early, which destroys orthogonality without re-orthogonalisation
    eigs = torch.cat([torch.logspace(0, 4, 20, dtype=torch.float64), torch.linspace(0, 1, 380, dtype=torch.float64)])
    A = known_spectrum(eigs, seed=3)
    v0 = torch.ones(400, dtype=torch.float64)
    full = lanczos(A, 120, v0=v0, keep_basis=True)
    Q = full.basis
    assert full.steps == 120 and Q.shape == (120, 400)
    assert (Q @ Q.T - torch.eye(120, dtype=torch.float64)).abs().max() < 1e-10
    T = full.tridiagonal()
    assert (Q @ A @ Q.T - T).abs().max() < 1e-8 * eigs.max()
    # the plain three-term recurrence on the same problem: ghost copies of the top eigenvalue
    plain = lanczos(A, 120, v0=v0, reorth=False)
    theta_plain = plain.ritz()[0]
    theta_full = full.ritz()[0]
    near_top = lambda th: int(((th - 1e4).abs() < 1e-3 * 1e4).sum())
    assert near_top(theta_full) == 1
    assert near_top(theta_plain) > 1


def test_breakdown_on_an_invariant_subspace_gives_the_exact_spectrum():
    eigs = torch.tensor([1.0, 2.0, 3.0, 7.0, -4.0], dtype=torch.float64).repeat_interleave(20)  # 5 distinct values
    A = known_spectrum(eigs, seed=4)
    r = lanczos(A, 50, generator=torch.Generator().manual_seed(0))
    assert r.breakdown and r.steps == 5
    theta = r.ritz()[0]
    assert torch.allclose(theta, torch.tensor([-4.0, 1.0, 2.0, 3.0, 7.0], dtype=torch.float64), atol=1e-10)


def test_steps_are_capped_at_the_dimension_and_operators_count_products():
    A = known_spectrum(torch.arange(1.0, 9.0), seed=5)
    op = MatrixOperator(A)
    r = lanczos(op, 30, generator=torch.Generator().manual_seed(0))
    assert r.steps == 8 and op.matvecs == 8
    assert torch.allclose(r.ritz()[0], torch.arange(1.0, 9.0, dtype=torch.float64), atol=1e-10)


def test_bad_arguments():
    A = known_spectrum(torch.arange(1.0, 5.0))
    with pytest.raises(HessianInputError, match="num_steps: 0"):
        lanczos(A, 0)
    with pytest.raises(HessianInputError, match="k: 5; the operator has dimension 4"):
        top_eigenvalues(A, 5)
    with pytest.raises(HessianInputError, match="which: 'top'"):
        top_eigenvalues(A, 1, which="top")
    with pytest.raises(HessianInputError, match="square 2-D tensor"):
        lanczos(torch.zeros(3, 4), 2)
    with pytest.raises(HessianInputError, match="start vector"):
        lanczos(A, 2, v0=torch.zeros(4, dtype=torch.float64))


def test_multiple_eigenvalues_are_found_after_breakdown():
    eigs = torch.cat([torch.full((30,), 9.0), torch.full((70,), 1.0)]).double()  # two distinct values
    A = known_spectrum(eigs, seed=6)
    r = top_eigenvalues(A, 3, max_steps=20, generator=torch.Generator().manual_seed(0))
    assert r.eigenvalues.tolist() == pytest.approx([9.0, 9.0, 9.0], rel=1e-10)
    # plain Lanczos (SLQ's) stops at the invariant subspace instead: its quadrature is exact there
    assert lanczos(A, 20, generator=torch.Generator().manual_seed(0)).steps == 2
