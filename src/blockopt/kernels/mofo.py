"""MoFO step: Adam moments for every entry, Adam's update only on the entries with the largest |m|.

Pure math on lists of tensors, one signature for both second-moment layouts:

* ``params[i]`` is updated in place; ``exp_avgs[i]`` (first moment, the shape of
  the parameter) and ``exp_avg_sqs[i]`` (second moment: the shape of the
  parameter when ``geometries[i]`` is ``None``, else 1-D with one value per
  block of that geometry, as in Adam-mini) are updated in place;
  ``state_steps[i]`` is a 0-dim float tensor incremented by one.
* ``fractions[i]`` is the share of entries that move (``1.0``: all of them,
  plain Adam/Adam-mini); ``decay[i]`` says whether decoupled weight decay
  applies to parameter ``i``.
* Arithmetic happens in the dtype of the state; a low-precision parameter is
  updated through an up-cast copy and written back once.

One step (``docs/algorithms.md``, section 6)::

    W   <- W * (1 - lr * wd)                     # every entry, where decay applies
    m   <- b1 * m + (1 - b1) * G
    v   <- b2 * v + (1 - b2) * G**2              # or, per block b: mean_{i in b} G_i**2
    k   =  int(fraction * numel)  (at least 1)
    S   =  {i : |m_i| >= k-th largest |m|}       # ties at the threshold all move
    W_i <- W_i - lr / (1 - b1**t) * m_i / (sqrt(v_i) / sqrt(1 - b2**t) + eps)   for i in S only
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .adam_mini import adam_mini_update, block_statistics, factored_rows, geometry_appliers
from .blocks import Geometry

__all__ = ["mofo_mask", "mofo_step", "num_moved"]


def num_moved(numel: int, fraction: float) -> int:
    """How many entries of a tensor with ``numel`` entries MoFO moves: ``int(fraction * numel)``, at least 1.

    ``int`` (rounding down) is what the authors' release does; it would fail for
    ``k == 0`` (a tensor smaller than ``1 / fraction``), so at least one entry moves.
    """
    if fraction >= 1.0:
        return numel
    return max(1, min(numel, int(numel * fraction)))


def mofo_mask(exp_avg: torch.Tensor, fraction: float) -> torch.Tensor | None:
    """Boolean mask of the entries that move (``|m| >= k-th largest |m|``), or ``None`` when all move."""
    k = num_moved(exp_avg.numel(), fraction)
    if k >= exp_avg.numel():
        return None
    mag = exp_avg.abs()
    threshold = torch.topk(mag.reshape(-1), k, sorted=False).values.min()
    return mag >= threshold


def mofo_step(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    state_steps: Sequence[torch.Tensor],
    geometries: Sequence[Geometry | None],
    fractions: Sequence[float],
    decay: Sequence[bool],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    maximize: bool,
) -> None:
    """One MoFO step for every parameter in the lists (see the module docstring): Adam's (or
    Adam-mini's) update, in the direction of the filtered first moment. The statistic and the
    update are :mod:`blockopt.kernels.adam_mini`'s; only the direction is MoFO's."""
    for p, g, m, v, step_t, geometry, fraction, wd_on in zip(
        params, grads, exp_avgs, exp_avg_sqs, state_steps, geometries, fractions, decay, strict=True
    ):
        g = g.to(m.dtype)
        if maximize:
            g = -g
        (stat,) = block_statistics([g], [geometry]) if geometry is not None else (None,)
        apply = geometry_appliers([geometry])[0] if geometry is not None else _apply_elementwise

        def direction(m: torch.Tensor, fraction: float = fraction) -> torch.Tensor:
            mask = mofo_mask(m, fraction)
            return m if mask is None else torch.where(mask, m, 0)

        adam_mini_update([p], [g], [m], [v], [step_t], [stat], [wd_on], [apply], lr=lr, beta1=beta1,
                         beta2=beta2, eps=eps, weight_decay=weight_decay, maximize=False, direction=direction,
                         factored=factored_rows([geometry]) if geometry is not None else None)


def _apply_elementwise(w: torch.Tensor, m: torch.Tensor, denom: torch.Tensor, step_size: float) -> None:
    w.addcdiv_(m, denom, value=-step_size)
