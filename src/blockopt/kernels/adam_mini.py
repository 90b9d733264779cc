"""Adam-mini step functions: pure math on lists of tensors.

Both implementations share one signature and one contract:

* ``params[i]`` is updated in place; ``exp_avgs[i]`` (first moment, the shape
  of the parameter, in the state dtype) and ``block_exp_avg_sqs[i]`` (1-D, one
  second-moment scalar per block) are updated in place; ``state_steps[i]`` is a
  0-dim float tensor incremented by one.
* ``geometries[i]`` says which elements form each block (see
  :mod:`blockopt.kernels.blocks`); ``decay[i]`` says whether decoupled weight
  decay applies to parameter ``i``.
* Arithmetic happens in the dtype of the state; a low-precision parameter is
  updated through an up-cast copy and written back once.

One step for every parameter (``docs/algorithms.md``, section 1)::

    W   <- W * (1 - lr * wd)                                  # where decay applies
    m   <- b1 * m + (1 - b1) * G
    v_b <- b2 * v_b + (1 - b2) * mean_{i in b} G_i**2           # every block b
    W_i <- W_i - lr / (1 - b1**t) * m_i / (sqrt(v_b) / sqrt(1 - b2**t) + eps)

A factored matrix (``geometry.axis == FACTORED``) keeps ``v = [R; C]``, one value per row and one
per column, each an EMA of the mean of ``G**2`` along its row or column. An element's denominator is
``sqrt(R_i / (1 - b2**t)) * s_j + eps``, where ``s_j = sqrt(C_j / mean(C))`` is the column shape of
the EMAs *before* this step's update (1 while they are all zero): the row EMA carries the scale and
its bias correction, the column EMA a normalised shape, one step old, so that the fused kernels
update a matrix in one pass (``docs/algorithms.md``).

:func:`adam_mini_reference` is the plain loop the tests trust; it finds blocks
with an index map built independently of the views that
:func:`adam_mini_foreach` uses, and of :func:`~blockopt.kernels.blocks.coordinate_block_ids` (its own
copy of that arithmetic, on purpose). The foreach step is two pieces: the block
statistic (:func:`block_statistics`) and the update given a statistic
(:func:`adam_mini_update`), which FSDP2 (statistic from reduced local sums) and
MoFO (a filtered direction) call too.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import torch

from .blocks import Geometry, block_sizes, block_views, is_elementwise, is_factored

__all__ = ["adam_mini_foreach", "adam_mini_reference", "adam_mini_update", "block_statistics", "factored_rows",
           "factored_statistic", "geometry_appliers"]

#: ``apply(w, m, denom, step_size)``: ``w -= step_size * m / denom[block]``, in place
Applier = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], None]


def adam_mini_reference(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    block_exp_avg_sqs: Sequence[torch.Tensor],
    state_steps: Sequence[torch.Tensor],
    geometries: Sequence[Geometry],
    decay: Sequence[bool],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    maximize: bool,
) -> None:
    """Plain per-parameter loop; the ground truth for every fast path."""
    for p, g, m, v, step_t, geometry, wd_on in zip(
        params, grads, exp_avgs, block_exp_avg_sqs, state_steps, geometries, decay, strict=True
    ):
        compute_dtype = m.dtype
        g = g.to(compute_dtype)
        if maximize:
            g = -g
        w = p.detach().to(compute_dtype, copy=True)
        step_t += 1
        # under torch.compile the counter stays a tensor (no .item(): no graph break)
        step = step_t if _compiling() else step_t.item()

        if is_factored(geometry):
            _factored_reference(w, g, m, v, step, wd_on, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                                weight_decay=weight_decay)
            p.copy_(w)
            continue
        ids = _element_block_ids(tuple(p.shape), geometry).reshape(-1).to(p.device)
        num_blocks = v.numel()
        # block sums in float64 (the ground truth should be the most accurate path): squares summed
        # along the geometry's coordinate, then added into blocks by index
        g_sq_sum = _block_sq_sums(g.to(torch.float64), geometry, num_blocks)
        counts = torch.tensor(block_sizes(tuple(p.shape), geometry), dtype=torch.float64, device=p.device)
        block_mean = (g_sq_sum / counts).to(compute_dtype)

        if wd_on and weight_decay != 0:
            w.mul_(1 - lr * weight_decay)
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).add_(block_mean, alpha=1 - beta2)
        bias_correction1 = 1 - beta1**step
        bias_correction2 = 1 - beta2**step
        denom = v.sqrt() / bias_correction2**0.5 + eps  # one per block
        per_element_denom = denom[ids].reshape(p.shape)
        if isinstance(step, torch.Tensor):
            w.sub_(m / per_element_denom * (lr / bias_correction1).to(compute_dtype))
        else:
            w.addcdiv_(m, per_element_denom, value=-lr / bias_correction1)
        p.copy_(w)


def _factored_reference(w: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, step, wd_on: bool, *,
                        lr: float, beta1: float, beta2: float, eps: float, weight_decay: float) -> None:
    """One factored matrix, written out in float64: the column shape from the EMAs before the step,
    the row EMA, the update, then the column EMA."""
    rows = w.shape[0]
    sq = g.to(torch.float64) ** 2
    c_old = v[rows:].to(torch.float64)
    c_mean = c_old.mean()
    shape = (c_old / c_mean).sqrt() if c_mean > 0 else torch.ones_like(c_old)
    if wd_on and weight_decay != 0:
        w.mul_(1 - lr * weight_decay)
    m.lerp_(g, 1 - beta1)
    v[:rows] = (beta2 * v[:rows].to(torch.float64) + (1 - beta2) * sq.sum(dim=1) / sq.shape[1]).to(v.dtype)
    row = (v[:rows].to(torch.float64) / (1 - beta2**step)).sqrt()
    denom = row[:, None] * shape[None, :] + eps
    w.sub_((m.to(torch.float64) / denom * (lr / (1 - beta1**step))).to(w.dtype))
    v[rows:] = (beta2 * c_old + (1 - beta2) * sq.sum(dim=0) / sq.shape[0]).to(v.dtype)


def _block_sq_sums(g64: torch.Tensor, geometry: Geometry, num_blocks: int) -> torch.Tensor:
    """Sum of ``g**2`` per block: per coordinate (row, column, (slice, column) or flat run), then into
    blocks by each coordinate's block id (plain index arithmetic, not :func:`block_views`)."""
    axis, segments = geometry
    sq = g64 * g64
    if axis == -1:
        ((size, unit),) = segments
        return sq.reshape(-1) if unit == 1 else sq.reshape(size // unit, unit).sum(dim=1)
    if axis == 2:
        along = sq.sum(dim=1).reshape(-1)  # [slices * columns], slice-major
    else:
        along = sq.movedim(axis, 0).reshape(sq.shape[axis], -1).sum(dim=1)
    ids = _coordinate_ids(segments).to(g64.device)
    return torch.zeros(num_blocks, dtype=torch.float64, device=g64.device).index_add_(0, ids, along)


# The reference keeps its own copy of the geometry-to-block-id arithmetic, on purpose: everything else
# calls blockopt.kernels.blocks.coordinate_block_ids, and the reference is the check on it.
def _coordinate_ids(segments: tuple[tuple[int, int], ...]) -> torch.Tensor:
    """Block id of every index along the geometry's coordinate (concatenated over the segments)."""
    ids, first = [], 0
    for size, unit in segments:
        ids.append(first + torch.arange(size) // unit)
        first += size // unit
    return torch.cat(ids)


def _element_block_ids(shape: tuple[int, ...], geometry: Geometry) -> torch.Tensor:
    """Block id of every element of a tensor of ``shape`` (int64, that shape), from :func:`_coordinate_ids`."""
    axis, segments = geometry
    along = _coordinate_ids(segments)
    if axis == -1:
        return along.reshape(shape)
    if axis == 2:  # coordinate (slice, column), slice-major; every row of the slice shares it
        return along.reshape(shape[0], 1, shape[2]).expand(shape)
    view_shape = [1] * len(shape)
    view_shape[axis] = shape[axis]
    return along.reshape(view_shape).expand(shape)


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def _needs_contiguous(t: torch.Tensor, geometry: Geometry) -> bool:
    axis, ((size, unit), *_) = geometry
    return axis == -1 and 1 < unit < size and not t.is_contiguous()


def _readable(t: torch.Tensor, geometry: Geometry) -> torch.Tensor:
    """``t``, or a contiguous copy where :func:`block_views` needs one (read-only uses)."""
    return t.contiguous() if _needs_contiguous(t, geometry) else t


def _block_mean_sq(g_views: list[torch.Tensor]) -> torch.Tensor:
    """Mean of squares within each block, concatenated over the views."""
    means = []
    for gv in g_views:
        dims = tuple(range(1, gv.dim()))
        n = math.prod(gv.shape[1:])
        # vector_norm reads g once and makes no g**2 temporary
        means.append(torch.linalg.vector_norm(gv, 2, dim=dims).square_().div_(n))
    return means[0] if len(means) == 1 else torch.cat(means)


def _apply_update(
    w: torch.Tensor, m: torch.Tensor, denom: torch.Tensor, step_size: float, geometry: Geometry
) -> None:
    """``w -= step_size * m / denom[block]`` in place, through block views.

    ``addcdiv`` with the per-block denominator broadcast over each block: the
    same arithmetic as torch's AdamW, so size-1 blocks reproduce it exactly.
    """
    if is_elementwise(geometry) or is_factored(geometry):  # a factored denominator is already [rows, cols]
        w.addcdiv_(m, denom.view(w.shape), value=-step_size)
        return
    if _needs_contiguous(w, geometry):  # runs of flat elements have no view in a strided tensor
        tmp = w.contiguous()
        _apply_update(tmp, m.contiguous(), denom, step_size, geometry)
        w.copy_(tmp)
        return
    m = m.contiguous() if _needs_contiguous(m, geometry) else m
    start = 0
    for wv, mv in zip(block_views(w, geometry), block_views(m, geometry), strict=True):
        n = wv.shape[0]
        d = denom.narrow(0, start, n).view((n,) + (1,) * (wv.dim() - 1))
        # w and m may differ in memory layout (a non-contiguous parameter, contiguous state)
        wv.addcdiv_(mv.reshape(wv.shape), d, value=-step_size)
        start += n


def factored_statistic(g: torch.Tensor) -> torch.Tensor:
    """A matrix's factored statistic: the mean of ``g**2`` along each row, then along each column
    (``rows + cols`` values)."""
    rows, cols = g.shape
    return torch.cat([torch.linalg.vector_norm(g, 2, dim=1).square_().div_(cols),
                      torch.linalg.vector_norm(g, 2, dim=0).square_().div_(rows)])


def block_statistics(grads: Sequence[torch.Tensor], geometries: Sequence[Geometry]) -> list[torch.Tensor | None]:
    """The second-moment statistic of each gradient: the mean of ``g**2`` over every block (1-D,
    one value per block), ``None`` for per-element blocks (their update uses ``g * g`` itself), or the
    row and column means of a factored matrix (:func:`factored_statistic`)."""
    return [None if is_elementwise(geometry) else factored_statistic(g) if is_factored(geometry)
            else _block_mean_sq(block_views(_readable(g, geometry), geometry))
            for g, geometry in zip(grads, geometries, strict=True)]


def factored_rows(geometries: Sequence[Geometry]) -> list[int]:
    """For :func:`adam_mini_update`: the row count of each factored matrix, 0 for block geometries."""
    return [g.segments[0][0] if is_factored(g) else 0 for g in geometries]


def _column_shape(v: torch.Tensor, rows: int) -> torch.Tensor:
    """``sqrt(C / mean(C))`` of a factored matrix's column EMAs (ones while they are all zero)."""
    c = v[rows:]
    mean = c.mean()
    return torch.where(mean > 0, c / mean.clamp_min(torch.finfo(c.dtype).tiny), torch.ones_like(c)).sqrt_()


def geometry_appliers(geometries: Sequence[Geometry]) -> list[Applier]:
    """For :func:`adam_mini_update`: write ``w -= step_size * m / denom[block]`` through each geometry's views."""
    return [functools.partial(_apply_update, geometry=geometry) for geometry in geometries]


def adam_mini_update(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    second_moments: Sequence[torch.Tensor],
    state_steps: Sequence[torch.Tensor],
    statistics: Sequence[torch.Tensor | None],
    decay: Sequence[bool],
    appliers: Sequence[Applier],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    maximize: bool,
    direction: Callable[[torch.Tensor], torch.Tensor] | None = None,
    factored: Sequence[int] | None = None,
) -> None:
    """The update, given each tensor's second-moment statistic: the one place (with the reference
    loop) that the Adam-mini arithmetic is written in Python.

    ``statistics[i]`` is the new block statistic (mean of ``g**2`` per block, in the order of
    ``second_moments[i]``; ``None``: per element, ``g * g``). The caller computes it: from block
    views on one process (:func:`block_statistics`), from local sums reduced across ranks under
    FSDP2. ``appliers[i](w, m, denom, step_size)`` writes ``w -= step_size * m / denom`` with the
    per-block ``denom`` broadcast over the tensor's layout (block views, or a shard's layout).
    ``direction`` (MoFO) maps the updated first moment to the direction the step takes.
    ``factored[i]`` (:func:`factored_rows`) is the row count of a factored matrix, whose statistic
    is its row then column means, whose denominator uses the column EMAs before this step, and whose
    applier receives the ``[rows, cols]`` denominator.
    Multi-tensor (``torch._foreach_*``) operations for the element-wise work.
    """
    if not params:
        return
    params = list(params)
    exp_avgs = list(exp_avgs)
    vs = list(second_moments)

    # Low-precision parameters: compute on an up-cast copy, write back at the end.
    work = [p if p.dtype == m.dtype else p.to(m.dtype) for p, m in zip(params, exp_avgs)]
    grads = [g if g.dtype == m.dtype else g.to(m.dtype) for g, m in zip(grads, exp_avgs)]
    if maximize:
        grads = torch._foreach_neg(grads)

    torch._foreach_add_(list(state_steps), 1.0)
    compiling = _compiling()
    # under torch.compile the counters stay tensors (no .item(): no graph break)
    steps = list(state_steps) if compiling else [s.item() for s in state_steps]

    if weight_decay != 0:
        decayed = [w for w, on in zip(work, decay) if on]
        if decayed:
            torch._foreach_mul_(decayed, 1 - lr * weight_decay)

    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    # factored matrices: their column shape from the EMAs before this step
    shapes = {i: _column_shape(vs[i], rows) for i, rows in enumerate(factored or ()) if rows}
    torch._foreach_mul_(vs, beta2)
    # per-element blocks: v += (1 - b2) * g * g, as AdamW does it
    elem = [i for i, st in enumerate(statistics) if st is None]
    if elem:
        flat = [grads[i].reshape(vs[i].shape) for i in elem]
        torch._foreach_addcmul_([vs[i] for i in elem], flat, flat, value=1 - beta2)
    blocked = [i for i, st in enumerate(statistics) if st is not None]
    if blocked:
        torch._foreach_add_([vs[i] for i in blocked], [statistics[i].to(vs[i].dtype) for i in blocked],
                            alpha=1 - beta2)

    # denom_b = sqrt(v_b) / sqrt(1 - b2**t) + eps, one per block
    denoms = list(torch._foreach_sqrt(vs))
    torch._foreach_div_(denoms, [(1 - beta2**s) ** 0.5 for s in steps])
    for i, shape in shapes.items():  # [rows, cols]: sqrt(R / bc2) times the column shape
        denoms[i] = torch.outer(denoms[i][:factored[i]], shape)
    torch._foreach_add_(denoms, eps)
    if compiling:  # the step size as a tensor, folded into the denominators
        torch._foreach_div_(denoms, [(lr / (1 - beta1**s)).to(d.dtype) for s, d in zip(steps, denoms)])

    for w, m, d, s, apply in zip(work, exp_avgs, denoms, steps, appliers):
        if w.numel():  # an empty shard has nothing to update
            apply(w, m if direction is None else direction(m), d, 1.0 if compiling else lr / (1 - beta1**s))
    for p, w in zip(params, work):
        if w is not p:
            p.copy_(w)


def adam_mini_foreach(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    block_exp_avg_sqs: Sequence[torch.Tensor],
    state_steps: Sequence[torch.Tensor],
    geometries: Sequence[Geometry],
    decay: Sequence[bool],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    maximize: bool,
) -> None:
    """Vectorised step: the block statistic by views (one reduction per tensor), then
    :func:`adam_mini_update`."""
    if not params:
        return
    stats = block_statistics(grads, geometries)
    adam_mini_update(params, grads, exp_avgs, block_exp_avg_sqs, state_steps, stats, decay,
                     geometry_appliers(geometries), lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                     weight_decay=weight_decay, maximize=maximize, factored=factored_rows(geometries))
