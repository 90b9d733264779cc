"""``blockopt.calibrate``: measure the SNR of Adam's second moment on a model, outside a training run.

It trains the model (with ``torch.optim.AdamW``, or with :class:`~blockopt.AdamMini` when sampling),
so it lives above the optimizers; the meters and the plan it feeds are :mod:`blockopt.partition`'s.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from ..partition import PartitionPlan, partition
from ..partition.snr import SampledSNRMeter, SNRCalibration, SNRMeter, measure_steps
from .adam_mini import AdamMini

__all__ = ["calibrate"]


def calibrate(
    model: nn.Module,
    batches: Iterable[Any],
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    *,
    steps: int,
    lr: float = 3e-3,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
    weight_decay: float = 0.1,
    warmup: int | None = None,
    points: int = 4,
    plan: PartitionPlan | None = None,
    sample: bool | Mapping[str, int] = False,
    seed: int = 0,
    grad_clip: float | None = 1.0,
) -> SNRCalibration:
    """Train ``model`` for ``steps`` steps and measure the SNR of Adam's ``v`` for every tensor.

    Args:
        model: trained in place (pass a copy to keep it).
        batches: yields one batch per step (at least ``steps``).
        loss_fn: ``loss_fn(model, batch)`` -> scalar loss.
        steps: the calibration window; ``v`` is measured at ``points`` steps of its
            second half (:func:`~blockopt.partition.snr.measure_steps`).
        lr, betas, eps, weight_decay: the optimizer's; SNR depends on the learning
            rate (higher rates lower it), so use the run's. ``warmup`` steps of
            linear warmup (default 10 % of ``steps``), then constant.
        plan: the structural plan that gives roles and candidates (default
            ``blockopt.partition(model)``).
        sample: ``False`` trains with ``torch.optim.AdamW`` and measures its full
            ``v`` (exact; AdamW's memory). ``True`` or ``{"max_blocks": .., "max_elements": ..}``
            trains with :class:`~blockopt.AdamMini` (half the state) and measures a
            :class:`~blockopt.partition.snr.SampledSNRMeter`'s running ``v`` on a random sample:
            bounded memory, an estimate (its error is stated in ``docs/snr.md``).
        seed: the sample's seed.
        grad_clip: clip the gradient norm to this (``None``: no clipping).

    Returns:
        an :class:`~blockopt.partition.snr.SNRCalibration`; feed it to
        ``blockopt.partition(model, snr=...)`` or ``SNRRules.from_calibration``.

    Example::

        >>> import copy, torch, blockopt
        >>> model = blockopt.models.build_model("llama-micro")
        >>> g = torch.Generator().manual_seed(0)
        >>> batches = [torch.randint(0, 256, (4, 33), generator=g) for _ in range(20)]   # your data here
        >>> calib = blockopt.calibrate(copy.deepcopy(model), batches, lambda m, b: m(b[:, :-1], b[:, 1:]),
        ...                            steps=20, lr=3e-3)
        >>> calib.steps                        # measured at 4 points of the window's second half
        [12, 15, 18, 20]
        >>> plan = blockopt.partition(model, snr=calib)
        >>> plan["blocks.0.attn.o_proj.weight"].snr_choice in ("row", "column", "head", "tensor", "element")
        True
        >>> opt = blockopt.AdamMini(model.named_parameters(), plan=plan, lr=3e-3)
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"Invalid steps: {steps!r}; expected a positive int")
    if isinstance(points, bool) or not isinstance(points, int) or not 1 <= points <= steps:
        raise ValueError(f"Invalid points: {points!r}; expected an int in [1, steps={steps}]")
    warmup = max(1, steps // 10) if warmup is None else warmup
    if plan is None:
        plan = partition(model, warn=False)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    source = {"lr": lr, "betas": list(betas), "weight_decay": weight_decay, "steps": steps}
    if sample:
        opts = dict(sample) if isinstance(sample, Mapping) else {}
        meter: SNRMeter | SampledSNRMeter = SampledSNRMeter(plan, beta2=betas[1], seed=seed, source=source, **opts)
        opt: torch.optim.Optimizer = AdamMini(named, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                              plan=plan)
    else:
        meter = SNRMeter(plan, source=source)
        decay = [p for n, p in named if plan[n].weight_decay]
        rest = [p for n, p in named if not plan[n].weight_decay]
        groups = [g for g in ({"params": decay, "weight_decay": weight_decay},
                              {"params": rest, "weight_decay": 0.0}) if g["params"]]
        opt = torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)
    at = set(measure_steps(steps, points))
    it = iter(batches)
    model.train()
    for step in range(1, steps + 1):
        try:
            batch = next(it)
        except StopIteration:
            raise ValueError(f"Invalid batches: they ran out after {step - 1} of steps={steps}") from None
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, step / warmup) if warmup else lr
        loss = loss_fn(model, batch)
        loss.backward()
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_([p for _, p in named], grad_clip)
        if isinstance(meter, SampledSNRMeter):
            meter.update(named)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step in at:
            if isinstance(meter, SampledSNRMeter):
                meter.measure(step)
            else:
                meter.measure_optimizer(step, opt, named)
    return meter.calibration
