"""Lanczos tridiagonalisation with full re-orthogonalisation, and extreme eigenvalues.

Works on any symmetric operator with ``numel`` (its dimension), ``dtype``,
``device`` and ``matvec(v)``: a :class:`~blockopt.hessian.hvp.HessianOperator`,
one of its blocks, a :class:`~blockopt.hessian.hvp.MatrixOperator`, or a dense
symmetric tensor (wrapped automatically).

Algorithm (Golub & Van Loan, s. 10.1): from a unit vector ``q_1``,
``w = A q_j - alpha_j q_j - beta_{j-1} q_{j-1}``, ``beta_j = |w|``,
``q_{j+1} = w / beta_j``. In floating point the ``q_j`` lose orthogonality as
soon as a Ritz value converges, which produces spurious copies of extreme
eigenvalues ("ghosts") and wrong quadrature weights; with
``reorth=True`` (default) every new ``w`` is orthogonalised against all
previous ``q`` twice (classical Gram-Schmidt, "twice is enough"), which keeps
them orthogonal to working precision.

Memory: with re-orthogonalisation the basis ``Q`` (``steps x n`` values in
``dtype``, float64 by default) must be kept while the run lasts -- that is
the price of orthogonality. It is allocated once, freed when the run ends,
and returned only when asked (``keep_basis=True``, or eigenvectors from
:func:`top_eigenvalues`). Without re-orthogonalisation only three vectors are
kept (``3 n`` values), for operators too large for ``steps x n``. For
per-block spectra ``n`` is the size of the block, not of the model.
Breakdown (``beta_j`` ~ 0: the Krylov space is invariant) ends the run early;
the tridiagonal matrix is then exact on that subspace. :func:`top_eigenvalues`
instead restarts from a random direction orthogonal to the subspace found
(``T`` becomes block diagonal), so that multiple eigenvalues and eigenvalues
the start vector did not see are still found.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .hvp import HessianInputError, MatrixOperator

__all__ = ["EigenResult", "LanczosResult", "as_operator", "lanczos", "top_eigenvalues"]

#: a beta below this times the operator's norm estimate counts as breakdown
BREAKDOWN_TOL = 1e-10


def as_operator(op: Any) -> Any:
    """Dense tensors become a :class:`MatrixOperator`; operators pass through (checked for ``numel``/``matvec``)."""
    if isinstance(op, torch.Tensor):
        return MatrixOperator(op)
    if not callable(getattr(op, "matvec", None)) or not isinstance(getattr(op, "numel", None), int):
        raise HessianInputError(
            f"Invalid operator: {type(op).__name__} needs an int 'numel' and a 'matvec' method (or pass a square tensor)"
        )
    return op


def random_unit(n: int, generator: torch.Generator | None, dtype: torch.dtype, device: torch.device | str,
                kind: str = "rademacher") -> torch.Tensor:
    """A random unit vector drawn on the CPU (so the draw is the same on every device)."""
    if kind == "rademacher":
        v = torch.randint(0, 2, (n,), generator=generator).to(dtype) * 2 - 1
    elif kind == "gaussian":
        v = torch.randn(n, generator=generator, dtype=dtype)
    else:
        raise HessianInputError(f"Invalid probe kind: {kind!r}; allowed: 'rademacher', 'gaussian'")
    return (v / v.norm()).to(device)


@dataclass
class LanczosResult:
    """``alpha`` (diagonal, ``steps``) and ``beta`` (off-diagonal, ``steps - 1``) of ``T = Q^T A Q``, on CPU."""

    alpha: torch.Tensor
    beta: torch.Tensor
    basis: torch.Tensor | None
    steps: int
    breakdown: bool

    def tridiagonal(self) -> torch.Tensor:
        T = torch.diag(self.alpha)
        if self.steps > 1:
            T += torch.diag(self.beta, 1) + torch.diag(self.beta, -1)
        return T

    def ritz(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Eigenvalues of ``T`` (ascending) and its eigenvectors (columns)."""
        return torch.linalg.eigh(self.tridiagonal())


class _Lanczos:
    """Incremental Lanczos: one :meth:`step` per matrix-vector product."""

    def __init__(self, op: Any, max_steps: int, v0: torch.Tensor, reorth: bool, dtype: torch.dtype,
                 restart: bool = False, generator: torch.Generator | None = None) -> None:
        self.op = op
        self.restart = restart and reorth
        self.generator = generator
        self.restarts = 0
        self.n = op.numel
        self.max_steps = min(max_steps, self.n)
        self.reorth = reorth
        self.dtype = dtype
        self.device = getattr(op, "device", v0.device)
        q = v0.to(device=self.device, dtype=dtype)
        norm = q.norm()
        if not torch.isfinite(norm) or norm == 0:
            raise HessianInputError("Invalid start vector: it is zero or not finite")
        self.q = q / norm
        self.q_prev: torch.Tensor | None = None
        self.Q = torch.empty((self.max_steps, self.n), dtype=dtype, device=self.device) if reorth else None
        self.alpha: list[float] = []
        self.beta: list[float] = []
        self.anorm = 0.0
        self.done = False
        self.breakdown = False

    @property
    def steps(self) -> int:
        return len(self.alpha)

    def step(self) -> None:
        j = self.steps
        if self.done:
            return
        if self.Q is not None:
            self.Q[j] = self.q
        w = self.op.matvec(self.q).to(self.dtype)
        if not torch.isfinite(w).all():
            raise FloatingPointError(f"the operator returned non-finite values at Lanczos step {j + 1}")
        a = torch.dot(self.q, w)
        w = w - a * self.q
        if self.q_prev is not None:
            w = w - self.beta[-1] * self.q_prev
        if self.Q is not None:
            Qj = self.Q[: j + 1]
            for _ in range(2):  # twice is enough
                w = w - Qj.T @ (Qj @ w)
        b = float(w.norm())
        self.alpha.append(float(a))
        self.anorm = max(self.anorm, abs(float(a)) + b + (self.beta[-1] if self.beta else 0.0))
        if self.steps >= self.max_steps:
            self.done = True
            self.residual = b
            return
        if b <= BREAKDOWN_TOL * max(self.anorm, 1e-300):
            if self.restart and self.Q is not None:
                # invariant subspace found: go on from a fresh direction orthogonal to it, so that
                # eigenvalues outside it (or further copies of a multiple one) can still be found
                Qj = self.Q[: j + 1]
                w = random_unit(self.n, self.generator, self.dtype, self.device)
                for _ in range(2):
                    w = w - Qj.T @ (Qj @ w)
                if float(w.norm()) > 1e-8:
                    self.restarts += 1
                    self.beta.append(0.0)
                    self.q_prev = None  # T is block diagonal: no coupling to the previous block
                    self.q = w / w.norm()
                    self.residual = 0.0
                    return
            self.done = True
            self.breakdown = True
            self.residual = b
            return
        self.beta.append(b)
        self.q_prev = self.q
        self.q = w / b
        self.residual = b

    def result(self, keep_basis: bool) -> LanczosResult:
        basis = None
        if keep_basis and self.Q is not None:
            basis = self.Q[: self.steps]
        return LanczosResult(
            torch.tensor(self.alpha, dtype=torch.float64),
            torch.tensor(self.beta[: max(self.steps - 1, 0)], dtype=torch.float64),
            basis,
            self.steps,
            self.breakdown,
        )


def _check_steps(num_steps: Any) -> None:
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise HessianInputError(f"Invalid num_steps: {num_steps!r}; expected an int >= 1")


def lanczos(
    op: Any,
    num_steps: int,
    *,
    v0: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    reorth: bool = True,
    keep_basis: bool = False,
    dtype: torch.dtype = torch.float64,
) -> LanczosResult:
    """Run ``num_steps`` Lanczos steps (fewer if ``num_steps > n`` or on breakdown).

    Args:
        op: a symmetric operator or a square tensor (see the module docstring).
        num_steps: number of matrix-vector products.
        v0: start vector (default: a random Rademacher unit vector from ``generator``).
        reorth: full re-orthogonalisation (memory ``num_steps x n``); ``False``: three vectors.
        keep_basis: return the Lanczos vectors ``Q`` (``steps x n``) in the result.
        dtype: precision of the Lanczos vectors and of ``T``.
    """
    op = as_operator(op)
    _check_steps(num_steps)
    if keep_basis and not reorth:
        raise HessianInputError("Invalid keep_basis=True with reorth=False: the basis is only kept with re-orthogonalisation")
    if v0 is None:
        v0 = random_unit(op.numel, generator, dtype, getattr(op, "device", "cpu"))
    elif v0.dim() != 1 or v0.numel() != op.numel:
        raise HessianInputError(f"Invalid v0: shape {list(v0.shape)}, expected a flat vector of {op.numel}")
    run = _Lanczos(op, num_steps, v0, reorth, dtype)
    while not run.done:
        run.step()
    return run.result(keep_basis)


@dataclass
class EigenResult:
    """Ritz approximations: ``eigenvalues`` (ordered as asked), ``residuals`` (bounds on
    ``|A x - theta x|``, so ``|lambda - theta| <= residual``), optional ``eigenvectors`` (columns)."""

    eigenvalues: torch.Tensor
    residuals: torch.Tensor
    eigenvectors: torch.Tensor | None
    steps: int
    converged: bool


_WHICH = ("largest", "smallest", "magnitude")


def top_eigenvalues(
    op: Any,
    k: int = 1,
    *,
    which: str = "largest",
    max_steps: int = 100,
    tol: float = 1e-8,
    generator: torch.Generator | None = None,
    v0: torch.Tensor | None = None,
    return_vectors: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> EigenResult:
    """The ``k`` extreme eigenvalues of a symmetric operator by Lanczos with full re-orthogonalisation.

    Stops when every wanted Ritz value has residual ``<= tol * max(|theta|, ||T||)``
    or after ``max_steps`` products (``converged`` says which). ``which``:
    ``"largest"`` (algebraic, default), ``"smallest"`` or ``"magnitude"``.
    """
    op = as_operator(op)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise HessianInputError(f"Invalid k: {k!r}; expected an int >= 1")
    if k > op.numel:
        raise HessianInputError(f"Invalid k: {k}; the operator has dimension {op.numel}")
    if which not in _WHICH:
        raise HessianInputError(f"Invalid which: {which!r}; allowed: {', '.join(map(repr, _WHICH))}")
    _check_steps(max_steps)
    if not (tol > 0):
        raise HessianInputError(f"Invalid tol: {tol!r}; expected a positive number")
    if v0 is None:
        v0 = random_unit(op.numel, generator, torch.float64, getattr(op, "device", "cpu"))
    run = _Lanczos(op, max(max_steps, k), v0, True, torch.float64, restart=True, generator=generator)

    def pick(vals: torch.Tensor) -> torch.Tensor:
        if which == "largest":
            order = torch.argsort(vals, descending=True)
        elif which == "smallest":
            order = torch.argsort(vals)
        else:
            order = torch.argsort(vals.abs(), descending=True)
        return order[:k]

    converged = False
    while not run.done:
        run.step()
        if progress is not None:
            progress(run.steps, run.max_steps)
        if run.steps < k or run.residual == 0.0:  # not enough Ritz values yet, or just restarted
            continue
        res = run.result(False)
        vals, vecs = res.ritz()
        sel = pick(vals)
        resid = abs(run.residual) * vecs[-1, sel].abs() if not run.breakdown else torch.zeros(len(sel), dtype=torch.float64)
        scale = torch.clamp(vals[sel].abs(), min=run.anorm * 1e-3)
        if run.breakdown or run.steps == run.n or bool((resid <= tol * scale).all()):
            converged = True
            break
    res = run.result(True)
    vals, vecs = res.ritz()
    sel = pick(vals)
    if run.breakdown or run.steps == run.n:
        resid = torch.zeros(len(sel), dtype=torch.float64)
    else:
        resid = abs(run.residual) * vecs[-1, sel].abs()
    eigvecs = None
    if return_vectors:
        assert res.basis is not None
        eigvecs = res.basis.T @ vecs[:, sel].to(res.basis.device, res.basis.dtype)
    return EigenResult(vals[sel], resid, eigvecs, run.steps, converged)
