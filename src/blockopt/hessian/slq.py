"""Stochastic estimators: spectral density by stochastic Lanczos quadrature (SLQ), and the trace.

**SLQ** (Golub & Meurant; Ubaru, Chen & Saad 2017; Ghorbani, Krishnan & Xiao
2019). For a symmetric ``A`` of dimension ``n`` with eigenpairs
``(lambda_i, u_i)`` and a random unit probe ``v``, the measure
``sum_i (u_i . v)^2 delta(lambda - lambda_i)`` has expectation
``(1/n) sum_i delta(lambda - lambda_i)``: the spectral density. Running
``m`` Lanczos steps from ``v`` gives ``T_m = S diag(theta) S^T``; the Gauss
quadrature nodes ``theta_k`` with weights ``S[0, k]^2`` reproduce the first
``2m - 1`` moments of that measure. Averaging over probes and replacing every
delta by a Gaussian of width ``sigma`` gives a smooth density
``rho(x) = (1/P) sum_p sum_k w_pk N(x; theta_pk, sigma^2)`` whose weights sum
to 1 exactly, so it integrates to 1 on any grid that covers the nodes with a
margin of a few ``sigma`` (:class:`Grid` adds 6 ``sigma``).

**Grids.** Densities of several blocks are compared on one common grid. On a
``"linear"`` grid the axis is the eigenvalue. Hessian blocks differ by orders
of magnitude, so the default for comparing blocks is ``"symlog"``: the axis is
``t(lambda) = sign(lambda) * log10(1 + |lambda| / floor)``, linear within
``floor`` of zero and logarithmic (one unit per decade) outside, and the
Gaussian smoothing (a quarter decade by default) acts on ``t``. The density
is then the density of ``t(lambda)``; it still integrates to 1 over ``t``.

**Trace.** Hutchinson: ``E[v^T A v] = tr(A)`` for Rademacher ``v``.
Hutch++ (Meyer, Musco, Musco & Woodruff 2021): with ``m`` products, project out
the top of the range found from ``m/3`` random products, take that part's
trace exactly and Hutchinson on the rest; its error falls like ``1/m`` instead
of ``1/sqrt(m)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .hvp import HessianInputError
from .lanczos import as_operator, lanczos, random_unit

__all__ = [
    "Grid",
    "SpectralQuadrature",
    "TraceEstimate",
    "common_grid",
    "hutchinson",
    "hutchpp",
    "slq",
]

SCALES = ("linear", "symlog")
WEIGHTINGS = ("count", "curvature")


@dataclass
class SpectralQuadrature:
    """Gauss quadrature of a spectral density: one ``(nodes, weights)`` pair per probe (float64, CPU)."""

    nodes: list[torch.Tensor]
    weights: list[torch.Tensor]
    n: int
    #: eigenvalues found exactly by deflation (largest magnitude first) and their residual bounds
    deflated: torch.Tensor | None = None
    deflated_residuals: torch.Tensor | None = None

    @property
    def num_probes(self) -> int:
        return len(self.nodes)

    def all_nodes(self) -> torch.Tensor:
        return torch.cat(self.nodes)

    def lambda_min(self) -> float:
        return float(self.all_nodes().min())

    def lambda_max(self) -> float:
        return float(self.all_nodes().max())

    def mass(self, lo: float, hi: float) -> float:
        """Share of the spectrum in ``[lo, hi]`` (quadrature weight, averaged over probes)."""
        return float(sum(w[(x >= lo) & (x <= hi)].sum() for x, w in zip(self.nodes, self.weights)) / self.num_probes)

    def moment(self, k: int) -> float:
        """Estimate of ``(1/n) tr(A^k)``."""
        return float(sum((w * x**k).sum() for x, w in zip(self.nodes, self.weights)) / self.num_probes)

    def curvature_weighted(self) -> SpectralQuadrature:
        """The measure ``|lambda| d mu(lambda) / int |lambda| d mu``: where the block's curvature
        (the trace of ``|H|``) lives, rather than where its eigenvalues are counted. Each probe's
        weights are multiplied by ``|theta|`` and renormalised (a probe whose nodes are all zero keeps
        its weights)."""
        ws = []
        for x, w in zip(self.nodes, self.weights):
            c = w * x.abs()
            ws.append(c / c.sum() if c.sum() > 0 else w)
        return SpectralQuadrature(self.nodes, ws, self.n, self.deflated, self.deflated_residuals)

    def density(self, grid: Grid, weighting: str = "count") -> torch.Tensor:
        """Gaussian-smoothed density on ``grid`` (values at ``grid.points``, per unit of the grid's axis).

        ``weighting="count"``: the spectral density (eigenvalues counted); ``"curvature"``: the
        density of :meth:`curvature_weighted`.
        """
        if weighting not in WEIGHTINGS:
            raise HessianInputError(f"Invalid weighting: {weighting!r}; allowed: {', '.join(map(repr, WEIGHTINGS))}")
        if weighting == "curvature":
            return self.curvature_weighted().density(grid)
        out = torch.zeros_like(grid.points)
        s = grid.sigma
        for x, w in zip(self.nodes, self.weights):
            t = grid.transform(x)
            z = (grid.points[:, None] - t[None, :]) / s
            out += (torch.exp(-0.5 * z**2) * w[None, :]).sum(1)
        return out / (self.num_probes * s * math.sqrt(2 * math.pi))

    def probes(self, which: slice | Sequence[int]) -> SpectralQuadrature:
        """The quadrature of some of the probes only (e.g. ``slice(0, 2)``)."""
        idx = range(self.num_probes)[which] if isinstance(which, slice) else list(which)
        if not idx:
            raise HessianInputError("Invalid probe selection: it selects no probe")
        return SpectralQuadrature([self.nodes[i] for i in idx], [self.weights[i] for i in idx], self.n,
                                  self.deflated, self.deflated_residuals)

    def to_dict(self) -> dict[str, Any]:
        return {"n": self.n, "nodes": [x.tolist() for x in self.nodes], "weights": [w.tolist() for w in self.weights]}


@dataclass
class Grid:
    """A common axis for densities: ``points`` on the ``scale`` axis with Gaussian width ``sigma``.

    ``scale="symlog"`` uses ``t = sign(x) log10(1 + |x| / floor)``; ``"linear"`` uses ``t = x``.
    """

    points: torch.Tensor
    sigma: float
    scale: str = "linear"
    floor: float = 1.0

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.float64)
        if self.scale == "linear":
            return x
        return torch.sign(x) * torch.log10(1 + x.abs() / self.floor)

    def inverse(self, t: torch.Tensor) -> torch.Tensor:
        if self.scale == "linear":
            return t
        return torch.sign(t) * (10 ** t.abs() - 1) * self.floor

    @property
    def step(self) -> float:
        return float(self.points[1] - self.points[0])

    def integrate(self, density: torch.Tensor) -> float:
        return float(torch.trapezoid(density, self.points))

    def to_dict(self) -> dict[str, Any]:
        return {"scale": self.scale, "sigma": self.sigma, "floor": self.floor,
                "start": float(self.points[0]), "stop": float(self.points[-1]), "num_points": len(self.points)}


def common_grid(
    quadratures: Sequence[SpectralQuadrature],
    *,
    scale: str = "symlog",
    num_points: int = 2000,
    sigma: float | None = None,
    floor: float | None = None,
    floor_rel: float = 1e-3,
    margin: float = 6.0,
) -> Grid:
    """One grid that covers every quadrature's nodes with ``margin * sigma`` on both sides.

    ``sigma`` is the Gaussian width on the grid's axis: by default a quarter of
    a decade on a symlog grid, 1 % of the covered range on a linear grid.
    ``floor`` (symlog only): eigenvalues with ``|lambda|`` below it count as
    zero. By default it is ``floor_rel`` (1e-3) times the **median** over the
    quadratures of their largest ``|theta|``: three decades below the typical
    block's top curvature. The median, not the maximum, so that one block with
    huge curvature (an embedding, say) does not push every other block's
    spectrum into the "zero" bin. The step is at most ``sigma / 4``, so the
    trapezoid rule integrates each density to 1 within ~1e-6 (the Gaussians'
    tails beyond ``margin * sigma`` are below 1e-8).
    """
    if scale not in SCALES:
        raise HessianInputError(f"Invalid scale: {scale!r}; allowed: {', '.join(map(repr, SCALES))}")
    if not quadratures:
        raise HessianInputError("Invalid quadratures: an empty list")
    nodes = torch.cat([q.all_nodes() for q in quadratures])
    if not torch.isfinite(nodes).all():
        raise HessianInputError("Invalid quadratures: they hold non-finite eigenvalue estimates")
    if scale == "symlog":
        if floor is None:
            if not floor_rel > 0:
                raise HessianInputError(f"Invalid floor_rel: {floor_rel!r}; expected a positive number")
            tops = torch.tensor([float(q.all_nodes().abs().max()) for q in quadratures], dtype=torch.float64)
            typical = float(tops.median())
            if typical <= 0:
                typical = float(tops.max())
            floor = floor_rel * typical if typical > 0 else 1.0
        if not floor > 0:
            raise HessianInputError(f"Invalid floor: {floor!r}; expected a positive number")
        sigma = 0.25 if sigma is None else sigma
        t = Grid(torch.zeros(2, dtype=torch.float64), sigma, "symlog", floor).transform(nodes)
        lo, hi = float(t.min()), float(t.max())
    else:
        floor = 1.0
        lo, hi = float(nodes.min()), float(nodes.max())
        if sigma is None:
            sigma = 0.01 * (hi - lo) if hi > lo else max(abs(hi), 1.0) * 0.01
    if not sigma > 0:
        raise HessianInputError(f"Invalid sigma: {sigma!r}; expected a positive number")
    lo, hi = lo - margin * sigma, hi + margin * sigma
    n = max(num_points, math.ceil((hi - lo) / (sigma / 4)) + 1)
    n = min(n, 200_000)
    return Grid(torch.linspace(lo, hi, n, dtype=torch.float64), float(sigma), scale, float(floor))


def _check_count(name: str, v: Any, lo: int = 1) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise HessianInputError(f"Invalid {name}: {v!r}; expected an int >= {lo}")


class _Deflated:
    """``P H P`` with ``P = I - V V^T`` (``V``: orthonormal columns), on the complement of ``span(V)``."""

    def __init__(self, op: Any, V: torch.Tensor) -> None:
        self.op, self.V = op, V
        self.numel, self.dtype, self.device = op.numel, torch.float64, V.device

    def project(self, v: torch.Tensor) -> torch.Tensor:
        return v - self.V @ (self.V.T @ v)

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        return self.project(self.op.matvec(self.project(v.to(torch.float64))).to(torch.float64))


def slq(
    op: Any,
    *,
    num_probes: int = 4,
    num_steps: int = 30,
    generator: torch.Generator | None = None,
    reorth: bool = True,
    probe: str = "rademacher",
    deflate: int = 0,
    deflate_steps: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> SpectralQuadrature:
    """Stochastic Lanczos quadrature of the spectral density of ``op``.

    Cost: ``num_probes * num_steps`` matrix-vector products. Memory: the
    Lanczos basis of one probe (``num_steps x n`` float64 with ``reorth``).
    ``progress(done, total)`` is called after every probe.

    ``deflate=k`` first finds the ``k`` eigenpairs of largest magnitude
    (:func:`~blockopt.hessian.lanczos.top_eigenvalues`, at most
    ``deflate_steps`` -- default ``2 * num_steps`` -- more products) and puts
    them in every probe's quadrature exactly (weight ``1/n`` each); the
    probes then explore only the complement (``P H P``, weight ``(n-k)/n``).
    A random probe sees an isolated outlier with weight ``(u . v)^2``, whose
    relative standard deviation is ``sqrt(2)`` per probe; deflation removes
    that variance where a few outliers carry much of the curvature.
    """
    from .lanczos import top_eigenvalues

    op = as_operator(op)
    _check_count("num_probes", num_probes)
    _check_count("num_steps", num_steps)
    if isinstance(deflate, bool) or not isinstance(deflate, int) or deflate < 0:
        raise HessianInputError(f"Invalid deflate: {deflate!r}; expected an int >= 0")
    n = op.numel
    dev = getattr(op, "device", "cpu")
    k = min(deflate, max(n - 1, 0))
    exact_nodes = torch.zeros(0, dtype=torch.float64)
    exact_res = None
    target: Any = op
    if k > 0:
        top = top_eigenvalues(op, k, which="magnitude", max_steps=min(deflate_steps or 2 * num_steps, n),
                              tol=1e-6, generator=generator, return_vectors=True)
        V = torch.linalg.qr(top.eigenvectors.to(torch.float64))[0]
        exact_nodes = top.eigenvalues.to(torch.float64).cpu()
        exact_res = top.residuals.to(torch.float64).cpu()
        target = _Deflated(op, V)
    nodes, weights = [], []
    for p in range(num_probes):
        v0 = random_unit(n, generator, torch.float64, dev, probe)
        if k > 0:
            v0 = target.project(v0)
            v0 = v0 / v0.norm()
        res = lanczos(target, num_steps, v0=v0, reorth=reorth)
        theta, S = res.ritz()
        w = S[0] ** 2
        if k > 0:
            theta = torch.cat([exact_nodes, theta])
            w = torch.cat([torch.full((k,), 1.0 / n, dtype=torch.float64), w * (n - k) / n])
        nodes.append(theta)
        weights.append(w)
        if progress is not None:
            progress(p + 1, num_probes)
    return SpectralQuadrature(nodes, weights, n, exact_nodes if k > 0 else None, exact_res)


@dataclass
class TraceEstimate:
    """``value`` of the trace, ``std_error`` of the estimate (``None`` where not available), products used."""

    value: float
    std_error: float | None
    matvecs: int


def hutchinson(op: Any, num_samples: int = 32, *, generator: torch.Generator | None = None) -> TraceEstimate:
    """Hutchinson's trace estimator with Rademacher probes: ``mean(v^T A v)``."""
    op = as_operator(op)
    _check_count("num_samples", num_samples)
    vals = []
    dev = getattr(op, "device", "cpu")
    for _ in range(num_samples):
        v = (torch.randint(0, 2, (op.numel,), generator=generator).to(torch.float64) * 2 - 1).to(dev)
        vals.append(float(torch.dot(v, op.matvec(v).to(torch.float64))))
    t = torch.tensor(vals, dtype=torch.float64)
    se = float(t.std() / math.sqrt(num_samples)) if num_samples > 1 else None
    return TraceEstimate(float(t.mean()), se, num_samples)


def hutchpp(op: Any, num_matvecs: int = 30, *, generator: torch.Generator | None = None) -> TraceEstimate:
    """Hutch++ trace estimate with about ``num_matvecs`` products (a multiple of 3 is used exactly)."""
    op = as_operator(op)
    _check_count("num_matvecs", num_matvecs, 3)
    n = op.numel
    k = min(num_matvecs // 3, n)
    dev = getattr(op, "device", "cpu")

    def signs(cols: int) -> torch.Tensor:
        return (torch.randint(0, 2, (n, cols), generator=generator).to(torch.float64) * 2 - 1).to(dev)

    def apply(M: torch.Tensor) -> torch.Tensor:
        return torch.stack([op.matvec(c).to(torch.float64) for c in M.T], 1)

    S, G = signs(k), signs(k)
    Q, _ = torch.linalg.qr(apply(S))
    top = float(torch.trace(Q.T @ apply(Q)))
    G = G - Q @ (Q.T @ G)
    rest = float(torch.trace(G.T @ apply(G))) / k
    return TraceEstimate(top + rest, None, 3 * k)
