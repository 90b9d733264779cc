"""Block heterogeneity (Zhang et al. 2024, "Why Transformers Need Adam: A Hessian Perspective").

For every parameter block ``b`` a density of the spectrum of its own Hessian
``H_bb`` is estimated by SLQ with probes that are zero outside ``b`` (the
Lanczos vectors have the size of the block, not of the model); all densities
go on one common grid; the heterogeneity is the mean, over all pairs of
blocks, of the Jensen-Shannon **distance** between them.

Choices, and why (``benchmarks/hessian_findings.py`` measures each of them):

* **Blocks**: one per parameter tensor with at least two dimensions --
  weight matrices, convolution kernels, embeddings -- as in the paper, whose
  blocks are the weight matrices (query, key, value, projections, MLP,
  convolutions). The parts of a fused weight (QKV) are separate blocks when a
  :class:`~blockopt.partition.PartitionPlan` says where they are. 1-D tensors
  (biases, norm gains) are left out unless ``min_dim=1``: with tens of
  entries their spectra are a handful of spikes, far in JS distance from any
  continuous density whatever the architecture, so they would measure tensor
  sizes rather than curvature.
* **Axis**: symmetric-log (:func:`~blockopt.hessian.slq.common_grid`):
  blocks' curvatures differ by orders of magnitude, which is exactly the
  heterogeneity one learning rate cannot serve. ``|lambda|`` below ``floor``
  (1e-3 of the median block's largest ``|lambda|``) counts as zero; the
  Gaussian smoothing is a quarter decade wide.
* **Weighting** (default ``"curvature"``): the density compared is that of
  the measure ``|lambda| d mu(lambda)`` -- where a block's curvature (the
  trace of ``|H_bb|``) lies along the log axis -- not the eigenvalue count.
  Reason: SLQ resolves a spectrum on a *linear* scale (its ``m`` nodes are
  spread over ``[lambda_min, lambda_max]``), so with tens of steps it cannot
  place the many eigenvalues within a few decades of zero; on a log axis the
  plain count density is then badly biased (on the tiny Transformer, 40 steps
  give a heterogeneity of 0.62 where the exact spectra give 0.36), while the
  curvature-weighted density, in which near-zero eigenvalues weigh nothing,
  comes out within ~0.01 of the exact value. ``weighting="count"`` gives the
  plain spectral density (the paper's object) for those who accept that bias.
* **Deflation** (default 8): each block's 8 eigenvalues of largest magnitude
  are found by Lanczos and entered exactly; SLQ probes the rest. Outliers
  otherwise enter each probe with a chi-square weight, the dominant noise of
  curvature-weighted densities.
* **Distance**: the square root of the JS divergence in bits,
  ``sqrt(H(M) - (H(P) + H(Q)) / 2)`` with ``M = (P + Q) / 2``: a metric in
  ``[0, 1]`` (0: same density, 1: disjoint supports), on the discretised
  densities (``P_i = rho(x_i) dx``, renormalised).
* **Noise floor**: with ``num_probes >= 2`` the result carries
  ``noise_floor``, the mean JS distance between the densities of the first and
  second half of the probes of the *same* block. A heterogeneity not well
  above it says nothing.

The values are therefore not numerically comparable with the paper's JS0;
the comparison that carries over is between models measured the same way.
"""

from __future__ import annotations

import logging
import math
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..kernels.blocks import block_index
from ..partition import PartitionPlan
from .hvp import HessianInputError, HessianOperator
from .lanczos import top_eigenvalues
from .slq import Grid, SpectralQuadrature, common_grid, slq

__all__ = [
    "Block",
    "HeterogeneityResult",
    "block_spectra",
    "heterogeneity",
    "js_distance",
    "js_matrix",
    "model_heterogeneity",
    "plot_js_matrix",
    "plot_spectra",
    "tensor_blocks",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Block:
    """A parameter block: one or more tensors of the operator, or a slice (flat ``index``) of one tensor."""

    name: str
    params: tuple[str, ...]
    index: torch.Tensor | None = field(default=None, compare=False)
    role: str = ""

    def operator(self, op: HessianOperator):
        return op.restrict(list(self.params), self.index)


def tensor_blocks(op: HessianOperator, plan: PartitionPlan | None = None, *, min_dim: int = 1) -> list[Block]:
    """One block per tensor of ``op`` with at least ``min_dim`` dimensions; a fused weight in ``plan``
    gives one block per part (q, k, v).

    ``plan`` supplies the roles shown in reports and where fused parts start and end
    (the segments of its geometry, via :func:`~blockopt.kernels.blocks.block_index`).
    """
    blocks = []
    for name, shape in zip(op.names, op.shapes):
        if len(shape) < min_dim:
            continue
        entry = plan[name] if plan is not None and name in plan else None
        if entry is not None and entry.kind == "fused" and entry.parts:
            ids = block_index(shape, entry.geometry).reshape(-1)
            first = 0
            for part, (size, unit) in zip(entry.parts, entry.geometry.segments):
                count = size // unit
                mask = (ids >= first) & (ids < first + count)
                blocks.append(Block(f"{name}[{part}]", (name,), torch.nonzero(mask).reshape(-1), part))
                first += count
            continue
        blocks.append(Block(name, (name,), None, entry.role if entry is not None else ""))
    return blocks


def _entropy_bits(p: torch.Tensor) -> torch.Tensor:
    nz = p > 0
    return -(p[nz] * torch.log2(p[nz])).sum()


def js_distance(p: torch.Tensor, q: torch.Tensor) -> float:
    """Jensen-Shannon distance (base 2, in ``[0, 1]``) between two non-negative vectors on one grid."""
    p = p.to(torch.float64).clamp_min(0)
    q = q.to(torch.float64).clamp_min(0)
    if p.shape != q.shape:
        raise HessianInputError(f"Invalid densities: shapes {list(p.shape)} and {list(q.shape)} differ")
    if p.sum() <= 0 or q.sum() <= 0:
        raise HessianInputError("Invalid density: it has no mass on the grid")
    p, q = p / p.sum(), q / q.sum()
    m = 0.5 * (p + q)
    jsd = _entropy_bits(m) - 0.5 * (_entropy_bits(p) + _entropy_bits(q))
    return math.sqrt(min(max(float(jsd), 0.0), 1.0))


def js_matrix(densities: torch.Tensor) -> torch.Tensor:
    """Pairwise JS distances between the rows of ``densities`` (``[B, G]``), symmetric with zero diagonal."""
    B = densities.shape[0]
    out = torch.zeros(B, B, dtype=torch.float64)
    for i in range(B):
        for j in range(i + 1, B):
            out[i, j] = out[j, i] = js_distance(densities[i], densities[j])
    return out


def mean_offdiagonal(m: torch.Tensor) -> float:
    """Mean of the off-diagonal entries of a square matrix (0 for fewer than two rows)."""
    B = m.shape[0]
    if B < 2:
        return 0.0
    return float((m.sum() - m.diagonal().sum()) / (B * (B - 1)))


@dataclass
class HeterogeneityResult:
    """Per-block spectra on a common grid, their JS distances and the heterogeneity (mean distance)."""

    blocks: list[Block]
    numels: list[int]
    quadratures: list[SpectralQuadrature]
    grid: Grid
    densities: torch.Tensor  # [B, G]
    js: torch.Tensor  # [B, B]
    heterogeneity: float
    noise_floor: float | None
    matvecs: int
    top: dict[str, dict[str, Any]] = field(default_factory=dict)
    weighting: str = "curvature"

    @property
    def names(self) -> list[str]:
        return [b.name for b in self.blocks]

    def lambda_max(self) -> dict[str, float]:
        """Largest Ritz value of each block over the SLQ probes (a lower bound on ``lambda_max(H_bb)``
        that the extreme Ritz values approach quickly)."""
        return {b.name: q.lambda_max() for b, q in zip(self.blocks, self.quadratures)}

    def summary(self) -> dict[str, Any]:
        blocks = []
        for i, (b, n, q) in enumerate(zip(self.blocks, self.numels, self.quadratures)):
            row = {
                "name": b.name,
                "role": b.role,
                "numel": n,
                "lambda_max_slq": q.lambda_max(),
                "lambda_min_slq": q.lambda_min(),
                "trace_per_param": q.moment(1),
                "mean_js": float(self.js[i].sum() / max(len(self.blocks) - 1, 1)),
            }
            if b.name in self.top:
                row.update(self.top[b.name])
            blocks.append(row)
        return {
            "heterogeneity": self.heterogeneity,
            "noise_floor": self.noise_floor,
            "weighting": self.weighting,
            "num_blocks": len(self.blocks),
            "grid": self.grid.to_dict(),
            "matvecs": self.matvecs,
            "blocks": blocks,
        }


def _block_seed(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def block_spectra(
    op: HessianOperator,
    blocks: Sequence[Block] | None = None,
    *,
    num_probes: int = 4,
    num_steps: int = 40,
    deflate: int = 8,
    seed: int = 0,
    progress: Callable[[int, int, str], None] | None = None,
) -> list[SpectralQuadrature]:
    """SLQ of ``H_bb`` for every block (probes seeded from ``seed`` and the block's name;
    ``deflate`` outliers per block found exactly, see :func:`~blockopt.hessian.slq.slq`)."""
    blocks = list(blocks) if blocks is not None else tensor_blocks(op)
    out = []
    for i, b in enumerate(blocks):
        g = torch.Generator().manual_seed(_block_seed(seed, b.name))
        out.append(slq(b.operator(op), num_probes=num_probes, num_steps=num_steps, generator=g, deflate=deflate))
        if progress is not None:
            progress(i + 1, len(blocks), b.name)
    return out


def split_half_noise(quads: Sequence[SpectralQuadrature], grid: Grid, weighting: str = "curvature") -> float | None:
    """Mean JS distance between the densities of the first and second half of each block's probes."""
    vals = []
    for q in quads:
        if q.num_probes < 2:
            return None
        h = q.num_probes // 2
        vals.append(js_distance(q.probes(slice(0, h)).density(grid, weighting),
                                q.probes(slice(h, 2 * h)).density(grid, weighting)))
    return float(sum(vals) / len(vals)) if vals else None


def heterogeneity(
    op: HessianOperator,
    blocks: Sequence[Block] | None = None,
    *,
    plan: PartitionPlan | None = None,
    min_dim: int = 2,
    num_probes: int = 4,
    num_steps: int = 40,
    deflate: int = 8,
    weighting: str = "curvature",
    seed: int = 0,
    scale: str = "symlog",
    sigma: float | None = None,
    floor: float | None = None,
    num_points: int = 2000,
    top_k: int = 3,
    progress: Callable[[int, int, str], None] | None = None,
) -> HeterogeneityResult:
    """Block heterogeneity of the Hessian in ``op`` (see the module docstring for every choice).

    Args:
        op: a :class:`HessianOperator` over the parameters to study.
        blocks: the blocks (default: :func:`tensor_blocks` with ``plan`` and ``min_dim``).
        min_dim: default blocks are the tensors with at least this many dimensions (2: weights).
        num_probes, num_steps: SLQ probes and Lanczos steps per block.
        deflate: eigenpairs of largest magnitude per block entered exactly (up to ``2 * num_steps``
            more products per block); they are also the reported top eigenvalues.
        weighting: ``"curvature"`` (default) or ``"count"`` (the plain spectral density).
        seed: seeds the probes (each block's from ``seed`` and its name).
        scale, sigma, floor, num_points: the common grid (:func:`~blockopt.hessian.slq.common_grid`).
        top_k: how many of each block's largest-magnitude eigenvalues to report (computed by
            Lanczos to relative residual 1e-6; from the deflation when ``deflate >= top_k``).
        progress: ``progress(done, total, block_name)`` after each block.

    Cost: about ``num_probes * num_steps + 2 * num_steps`` Hessian-vector products per block.

    Returns:
        :class:`HeterogeneityResult`; ``.heterogeneity`` is the mean pairwise JS distance.
    """
    if blocks is None:
        blocks = tensor_blocks(op, plan, min_dim=min_dim)
        if len(blocks) < 2:
            raise HessianInputError(
                f"Invalid selection: {len(blocks)} tensor(s) with >= {min_dim} dimensions among {op.names[:6]}; "
                "heterogeneity compares at least two blocks (select more parameters, or pass min_dim=1 for 1-D ones)"
            )
    blocks = list(blocks)
    if len(blocks) < 2:
        raise HessianInputError(f"Invalid blocks: {len(blocks)} block(s); heterogeneity compares at least two")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise HessianInputError(f"Invalid top_k: {top_k!r}; expected an int >= 0")
    before = op.matvecs
    extra = bool(top_k) and deflate < top_k
    total = len(blocks) * (2 if extra else 1)
    step = [0]

    def tick(_done: int, _total: int, name: str) -> None:
        step[0] += 1
        if progress is not None:
            progress(step[0], total, name)

    quads = block_spectra(op, blocks, num_probes=num_probes, num_steps=num_steps, deflate=deflate, seed=seed,
                          progress=tick)
    grid = common_grid(quads, scale=scale, sigma=sigma, floor=floor, num_points=num_points)
    dens = torch.stack([q.density(grid, weighting) for q in quads])
    js = js_matrix(dens)
    numels = [b.operator(op).numel for b in blocks]
    top: dict[str, dict[str, Any]] = {}
    if top_k:
        for b, q in zip(blocks, quads):
            if not extra and q.deflated is not None:
                vals, res = q.deflated[:top_k], q.deflated_residuals[:top_k]
            else:
                sub = b.operator(op)
                g = torch.Generator().manual_seed(_block_seed(seed + 1, b.name))
                r = top_eigenvalues(sub, min(top_k, sub.numel), which="magnitude",
                                    max_steps=min(2 * num_steps, sub.numel), tol=1e-6, generator=g)
                vals, res = r.eigenvalues, r.residuals
                tick(0, 0, b.name)
            top[b.name] = {"top_eigenvalues": vals.tolist(), "top_residuals": res.tolist()}
    return HeterogeneityResult(blocks, numels, quads, grid, dens, js, mean_offdiagonal(js),
                               split_half_noise(quads, grid, weighting), op.matvecs - before, top, weighting)


def model_heterogeneity(
    model: nn.Module,
    batch: Any,
    loss_fn: Callable | None = None,
    params: Any = None,
    *,
    plan: PartitionPlan | None = None,
    seed: int = 0,
    mode: str = "measure",
    **kwargs: Any,
) -> HeterogeneityResult:
    """:func:`heterogeneity` for a model and a batch in one call (builds and frees the operator)."""
    with HessianOperator(model, batch, loss_fn, params, seed=seed, mode=mode) as op:
        return heterogeneity(op, plan=plan, seed=seed, **kwargs)


# ---------------------------------------------------------------------------
# plots (matplotlib, imported when called: pip install 'blockopt[bench]')


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise HessianInputError("Invalid request: plots need matplotlib (pip install 'blockopt[bench]')") from e
    return plt


def _symlog_ticks(ax: Any, grid: Grid) -> None:
    """Ticks at 0 and at +-10^k on a symlog grid, labelled with the eigenvalue."""
    if grid.scale != "symlog":
        return
    lo, hi = float(grid.points[0]), float(grid.points[-1])
    ticks, labels = [0.0], ["0"]
    top = max(abs(lo), abs(hi))
    k = math.ceil(math.log10(grid.floor))
    while True:
        t = math.log10(1 + 10.0**k / grid.floor)
        if t > top:
            break
        for sign in (1, -1):
            if lo <= sign * t <= hi:
                ticks.append(sign * t)
                labels.append(f"{'-' if sign < 0 else ''}1e{k}")
        k += 1
    order = sorted(range(len(ticks)), key=lambda i: ticks[i])
    ax.set_xticks([ticks[i] for i in order])
    ax.set_xticklabels([labels[i] for i in order], fontsize=7, rotation=45)


def plot_spectra(result: HeterogeneityResult, path: str | Path | None = None, *, ax: Any = None,
                 title: str = "", legend: bool = True) -> Any:
    """The blocks' densities on their common grid (log density axis); saves a PNG when ``path`` is
    given, draws into ``ax`` when given; returns the axes."""
    plt = _pyplot()
    fig = None
    if ax is None:
        fig, ax = plt.subplots(figsize=(8, 4.8), dpi=110)
    grid = result.grid
    cmap = plt.get_cmap("tab20")
    for i, (b, d) in enumerate(zip(result.blocks, result.densities)):
        ax.semilogy(grid.points.numpy(), d.clamp_min(1e-8).numpy(), lw=1, color=cmap(i % 20), label=b.name)
    ax.set_ylim(1e-4, None)
    _symlog_ticks(ax, grid)
    ax.set_xlabel(f"eigenvalue (symmetric log axis; |x| < {grid.floor:.2g} is 0)" if grid.scale == "symlog"
                  else "eigenvalue")
    ax.set_ylabel("curvature-weighted density" if result.weighting == "curvature" else "spectral density")
    if title:
        ax.set_title(title, fontsize=9)
    if legend and len(result.blocks) <= 20:
        ax.legend(fontsize=6, ncol=2, loc="upper left")
    if fig is not None:
        fig.tight_layout()
        if path is not None:
            fig.savefig(path)
        plt.close(fig)
    return ax


def plot_js_matrix(result: HeterogeneityResult, path: str | Path | None = None, *, ax: Any = None,
                   title: str = "") -> Any:
    """The pairwise JS distance matrix as an image (0 black, 1 light); PNG to ``path`` or into ``ax``."""
    plt = _pyplot()
    n = len(result.blocks)
    fig = None
    if ax is None:
        fig, ax = plt.subplots(figsize=(max(4.5, 0.35 * n + 2.5), max(4, 0.35 * n + 2)), dpi=110)
    im = ax.imshow(result.js.numpy(), vmin=0, vmax=1, cmap="magma")
    ax.figure.colorbar(im, ax=ax, label="JS distance", fraction=0.046)
    short = [b.name if len(b.name) <= 28 else "..." + b.name[-25:] for b in result.blocks]
    ax.set_xticks(range(n))
    ax.set_yticks(range(n))
    ax.set_xticklabels(short, rotation=90, fontsize=6)
    ax.set_yticklabels(short, fontsize=6)
    if title:
        ax.set_title(title, fontsize=9)
    if fig is not None:
        fig.tight_layout()
        if path is not None:
            fig.savefig(path)
        plt.close(fig)
    return ax
