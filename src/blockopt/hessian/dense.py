"""Dense Hessians of small tensors (or slices), heatmaps, and partition scores.

``dense_hessian`` builds ``H_bb`` column by column from Hessian-vector
products (batched with ``is_grads_batched`` where the model allows it), so
it costs ``n`` products for a block of ``n`` entries: meant for tensors or
slices of up to a few thousand entries.

**Partition score** (Adam-mini paper s. 2; Dong et al. 2025). For a
partition ``P`` of the block's entries,
``score(P) = ||H restricted to the blocks of P||_F / ||H||_F`` -- the share of
Hessian mass (Frobenius) that lies inside the blocks. What it can and cannot
say:

* It grows when blocks are merged: the partition into one block scores 1,
  so "per tensor" scores exactly 1 on a single tensor's own Hessian and is no
  competitor there. (Across several tensors it is meaningful: the share of
  mass inside tensors versus between them.)
* Finer partitions score lower: per row (output neuron) is a refinement of
  per head, so it can never score higher than per head.

So a partition is only judged against partitions with the **same block
sizes**. :func:`compare_partitions` reports, next to each score, the mean
score of random partitions with exactly the same block sizes (entries
shuffled; seeded) and the normalised **lift**
``(score - random) / (1 - random)``: 0 means "no more mass in the blocks than
chance", 1 means exactly block diagonal. For a query weight the evidence for
"near block diagonal by head" is: the per-head partition has a high score and
a high lift, far above the random partition with the same ``H`` blocks and
above the partition into ``H`` groups of input columns (another structured
partition with the same count and sizes); and per row scores clearly lower
than per head, i.e. the rows of one head are strongly coupled, so
one block per head -- not one per neuron -- is the right granularity for
queries and keys.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..kernels.blocks import Geometry, block_index
from ..partition import PlanEntry
from .hvp import BlockOperator, HessianInputError, HessianOperator

__all__ = [
    "MAX_DENSE",
    "PartitionScore",
    "compare_partitions",
    "dense_hessian",
    "partition_labels",
    "partition_score",
    "plan_slice",
    "plot_heatmap",
    "random_labels",
    "standard_partitions",
]

#: largest block ``dense_hessian`` builds unless told otherwise (8192^2 float64 = 512 MiB)
MAX_DENSE = 8192


def dense_hessian(
    op: HessianOperator | BlockOperator,
    params: str | list[str] | None = None,
    index: torch.Tensor | None = None,
    *,
    chunk: int = 64,
    symmetrize: bool = False,
    max_numel: int = MAX_DENSE,
    progress: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """The dense Hessian (float64, ``[n, n]``) of a block: tensors ``params`` of ``op`` or the flat
    ``index`` slice of one tensor (see :meth:`HessianOperator.restrict`)."""
    block = op.restrict(params, index) if isinstance(op, HessianOperator) else op
    n = block.numel
    if n > max_numel:
        raise HessianInputError(
            f"Invalid block: {n} entries (> max_numel={max_numel}); a dense Hessian costs {n} products and "
            f"{n * n * 8 / 2**20:.0f} MiB -- pass index= to take a slice, or raise max_numel"
        )
    cols = []
    eye = torch.eye(n, dtype=torch.float64, device=block.device)
    for s in range(0, n, chunk):
        cols.append(block.matmat(eye[:, s:s + chunk], chunk=chunk).to(torch.float64))
        if progress is not None:
            progress(min(s + chunk, n), n)
    H = torch.cat(cols, 1).cpu()
    return 0.5 * (H + H.T) if symmetrize else H


# ---------------------------------------------------------------------------
# partitions as label vectors


def partition_labels(
    shape: tuple[int, ...],
    kind: str | Geometry | PlanEntry,
    *,
    head_dim: int | None = None,
    num_blocks: int | None = None,
    axis: int = 0,
    index: torch.Tensor | None = None,
) -> torch.Tensor:
    """Block id of every entry of a tensor (flat, int64), optionally restricted to a flat ``index`` slice.

    ``kind``: ``"tensor"`` (one block), ``"element"``, ``"row"`` (one block per index of ``axis``),
    ``"head"`` (``head_dim`` consecutive indices of ``axis``), ``"columns"`` (``num_blocks`` equal
    groups of consecutive indices of dim 1: input features), ``"contiguous"`` (``num_blocks`` equal
    runs of the flattened tensor), a :class:`~blockopt.kernels.blocks.Geometry`, or a
    :class:`~blockopt.partition.PlanEntry` (the engine's plan).
    """
    shape = tuple(shape)
    numel = math.prod(shape)
    if isinstance(kind, PlanEntry):
        if kind.shape != shape:
            raise HessianInputError(f"Invalid plan entry {kind.name!r}: shape {list(kind.shape)}, expected {list(shape)}")
        labels = block_index(shape, kind.geometry)
    elif isinstance(kind, Geometry) or (isinstance(kind, tuple) and len(kind) == 2 and not isinstance(kind, str)):
        labels = block_index(shape, Geometry(*kind))
    elif kind == "tensor":
        labels = torch.zeros(shape, dtype=torch.long)
    elif kind == "element":
        labels = torch.arange(numel).reshape(shape)
    elif kind in ("row", "head"):
        if axis >= len(shape):
            raise HessianInputError(f"Invalid axis: {axis} for a tensor of shape {list(shape)}")
        unit = 1 if kind == "row" else head_dim
        if not isinstance(unit, int) or unit <= 0 or shape[axis] % unit:
            raise HessianInputError(f"Invalid head_dim: {head_dim!r}; it must divide dim {axis} of shape {list(shape)}")
        labels = block_index(shape, Geometry(axis, ((shape[axis], unit),)))
    elif kind == "columns":
        if len(shape) < 2 or not isinstance(num_blocks, int) or num_blocks <= 0 or shape[1] % num_blocks:
            raise HessianInputError(f"Invalid num_blocks: {num_blocks!r}; it must divide dim 1 of shape {list(shape)}")
        labels = block_index(shape, Geometry(1, ((shape[1], shape[1] // num_blocks),)))
    elif kind == "contiguous":
        if not isinstance(num_blocks, int) or num_blocks <= 0 or numel % num_blocks:
            raise HessianInputError(f"Invalid num_blocks: {num_blocks!r}; it must divide {numel} entries")
        labels = torch.arange(numel) // (numel // num_blocks)
    else:
        raise HessianInputError(
            f"Invalid partition kind: {kind!r}; allowed: 'tensor', 'element', 'row', 'head', 'columns', "
            "'contiguous', a Geometry or a PlanEntry"
        )
    labels = labels.reshape(-1)
    if index is not None:
        labels = labels[torch.as_tensor(index, dtype=torch.long)]
    return labels


def _plan_head_dim(entry: PlanEntry) -> int | None:
    """Head size of a head-kind entry, or of the first (query) part of a fused one."""
    axis, segments = entry.geometry
    if axis == -1:
        return None
    size, unit = segments[0]
    return unit if 1 < unit < size else None


def standard_partitions(
    shape: tuple[int, ...],
    entry: PlanEntry | None = None,
    *,
    head_dim: int | None = None,
    index: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """The partitions worth comparing on one weight (labels restricted to ``index``):

    ``per-tensor``; ``plan`` (the engine's, if ``entry``); ``per-row`` (one block per output
    neuron, on the plan's output axis); ``per-head`` (``head_dim`` consecutive output neurons,
    from ``head_dim`` or the plan); ``input-groups`` (as many equal groups of consecutive *input*
    features as the plan -- or per-head -- has blocks in the slice: a structured partition with the
    same count and sizes that ignores heads). Random partitions with the same sizes are added by
    :func:`compare_partitions`.
    """
    shape = tuple(shape)
    out: dict[str, torch.Tensor] = {"per-tensor": partition_labels(shape, "tensor", index=index)}
    if len(shape) != 2:
        if entry is not None:
            out["plan"] = partition_labels(shape, entry, index=index)
        if len(shape) > 2:
            out["per-row"] = partition_labels(shape, "row", index=index)
        return out
    axis = entry.geometry.axis if entry is not None and entry.geometry.axis in (0, 1) else 0
    if entry is not None:
        out["plan"] = partition_labels(shape, entry, index=index)
        head_dim = head_dim or _plan_head_dim(entry)
    out["per-row"] = partition_labels(shape, Geometry(axis, ((shape[axis], 1),)), index=index)
    if head_dim and shape[axis] % head_dim == 0 and head_dim < shape[axis]:
        out["per-head"] = partition_labels(shape, Geometry(axis, ((shape[axis], head_dim),)), index=index)
    ref = out.get("per-head", out.get("plan"))
    if ref is not None:
        groups = int(ref.unique().numel())
        inner = shape[1 - axis]
        if 1 < groups <= inner and inner % groups == 0:
            out["input-groups"] = partition_labels(shape, Geometry(1 - axis, ((inner, inner // groups),)), index=index)
    return out


def plan_slice(shape: tuple[int, ...], entry: PlanEntry | None, max_numel: int) -> torch.Tensor | None:
    """Flat indices of the first whole plan blocks that fit in ``max_numel`` entries (``None``: the whole
    tensor fits). Without a plan entry, or when one block is already larger, the first rows (dim 0)."""
    numel = math.prod(shape)
    if numel <= max_numel:
        return None
    if entry is not None:
        ids = block_index(tuple(shape), entry.geometry).reshape(-1)
        counts = torch.bincount(ids)
        fits = torch.nonzero(torch.cumsum(counts, 0) <= max_numel).reshape(-1)
        if fits.numel() > 0:
            k = int(fits[-1]) + 1
            return torch.nonzero(ids < k).reshape(-1)
    row = numel // shape[0] if shape else 1
    rows = max(1, max_numel // row)
    return torch.arange(min(rows * row, max_numel))


def random_labels(labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A random partition with the same block sizes as ``labels`` (the labels shuffled)."""
    return labels[torch.randperm(labels.numel(), generator=generator)]


def partition_score(H: torch.Tensor, labels: torch.Tensor) -> float:
    """``||H restricted to the blocks of labels||_F / ||H||_F`` (1 for one block)."""
    if H.dim() != 2 or H.shape[0] != H.shape[1] or labels.numel() != H.shape[0]:
        raise HessianInputError(f"Invalid partition: {labels.numel()} labels for a Hessian of shape {list(H.shape)}")
    H = H.to(torch.float64)
    total = float((H * H).sum())
    if total == 0:
        raise HessianInputError("Invalid Hessian: it is zero, so no partition can be scored")
    same = labels[:, None] == labels[None, :]
    inside = float((H * H * same).sum())
    return math.sqrt(inside / total)


@dataclass
class PartitionScore:
    name: str
    num_blocks: int
    score: float
    random: float  # mean score of random partitions with the same block sizes
    random_std: float

    @property
    def lift(self) -> float:
        """``(score - random) / (1 - random)``: 0 = chance, 1 = block diagonal (0 when ``random == 1``)."""
        return 0.0 if self.random >= 1 else (self.score - self.random) / (1 - self.random)

    def to_dict(self) -> dict[str, Any]:
        return {"partition": self.name, "num_blocks": self.num_blocks, "score": self.score,
                "random_same_sizes": self.random, "random_std": self.random_std, "lift": self.lift}


def compare_partitions(
    H: torch.Tensor, partitions: Mapping[str, torch.Tensor], *, seed: int = 0, trials: int = 8
) -> list[PartitionScore]:
    """Score each partition and the random partitions with its block sizes (``trials`` draws, seeded)."""
    out = []
    for name, labels in partitions.items():
        g = torch.Generator().manual_seed(seed)
        rand = torch.tensor([partition_score(H, random_labels(labels, g)) for _ in range(trials)], dtype=torch.float64)
        out.append(PartitionScore(name, int(labels.unique().numel()), partition_score(H, labels),
                                  float(rand.mean()), float(rand.std()) if trials > 1 else 0.0))
    return out


# ---------------------------------------------------------------------------
# heatmaps


def plot_heatmap(
    H: torch.Tensor,
    path: str | Path,
    *,
    labels: torch.Tensor | None = None,
    title: str = "",
    log: bool = True,
    ax_label: str = "parameter entry",
    max_lines: int = 128,
    dpi: int = 110,
) -> Path:
    """Draw ``|H|`` (log10 by default) to ``path`` (PNG), with block boundaries.

    With ``labels`` (one block id per entry, e.g. the plan's, from
    :func:`partition_labels`) the entries are reordered so that every block is
    contiguous (a stable sort by block id: the order inside a block is kept;
    for row/head blocks of a row-major tensor this is the identity) and the
    block boundaries are drawn as lines (up to ``max_lines`` of them).
    Needs matplotlib (``pip install blockopt[bench]``).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise HessianInputError("Invalid request: heatmaps need matplotlib (pip install 'blockopt[bench]')") from e
    A = H.detach().to(torch.float64).abs().cpu()
    n = A.shape[0]
    bounds: list[int] = []
    if labels is not None:
        if labels.numel() != n:
            raise HessianInputError(f"Invalid labels: {labels.numel()} labels for a Hessian of size {n}")
        order = torch.sort(labels.cpu(), stable=True).indices
        A = A[order][:, order]
        sl = labels.cpu()[order]
        bounds = (torch.nonzero(sl[1:] != sl[:-1]).reshape(-1) + 1).tolist()
    if log:
        pos = A[A > 0]
        lo = float(pos.min()) if pos.numel() else 1e-30
        A = torch.log10(A.clamp_min(lo))
    fig, ax = plt.subplots(figsize=(6.4, 5.6), dpi=dpi)
    im = ax.imshow(A.numpy(), cmap="viridis", interpolation="nearest",
                   vmin=float(A.max()) - 6 if log else None)
    fig.colorbar(im, ax=ax, label="log10 |H_ij|" if log else "|H_ij|")
    if 0 < len(bounds) <= max_lines:
        for b in bounds:
            ax.axhline(b - 0.5, color="white", lw=0.6, alpha=0.8)
            ax.axvline(b - 0.5, color="white", lw=0.6, alpha=0.8)
    ax.set_xlabel(ax_label)
    ax.set_ylabel(ax_label)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
