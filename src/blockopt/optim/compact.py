"""Compact weights for :class:`~blockopt.AdamMini` (``weights="bf16-sr"`` and the remainder formats).

:func:`adopt_weights` runs once, at construction. Every check comes first, so a
refusal changes nothing. Then each fp32 parameter is stored as bf16 in place
(``p.data`` is replaced, so the module, its hooks and the optimizer keep the
same ``Parameter`` objects), with its remainder in the optimizer state under
``weight_remainder``, split from the fp32 value so that no bit is lost at the
start. The module's floating buffers become bf16 too, so the forward runs in
bf16 as it does after ``model.to(torch.bfloat16)``. The step is
:func:`blockopt.kernels.dispatch.prepare_step` with ``weights=``: each tensor is
widened to fp32, stepped by its usual route, and stored back.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..distributed.dtensor import is_dtensor
from ..kernels import momentum as mom
from ..kernels import weights as cw

if TYPE_CHECKING:
    from .adam_mini import AdamMini

__all__ = ["adopt_weights"]


def adopt_weights(opt: AdamMini, model_or_params: Any, fmt: str | None) -> str | None:
    """Make ``opt``'s parameters compact in format ``fmt`` (``None``: leave them); returns ``fmt``.

    A module (``AdamMini(model, weights=...)``) hands its fp32 parameters over: they become bf16.
    Parameters passed as tensors must already be bf16 (the optimizer does not change the dtype of
    tensors it was not given the module of); their remainder starts at zero."""
    if fmt is None:
        _annotate(opt, None)
        return None
    cw.check_format(fmt)
    module = model_or_params if isinstance(model_or_params, nn.Module) else None
    params = [(opt.param_entries[p].name, p) for group in opt.param_groups for p in group["params"]]
    for name, p in params:  # every check first: a refusal changes nothing
        where = f"Invalid weights={fmt!r} for parameter {name!r}"
        if is_dtensor(p):
            raise ValueError(f"{where}: it is a DTensor (FSDP2); compact weights support plain tensors only")
        if opt.defaults["capturable"]:
            raise ValueError(f"{where}: compact weights have no capturable (CUDA graph) step; use capturable=False")
        if p.dtype == torch.float32 and module is None:
            raise ValueError(f"{where}: it is an fp32 tensor passed to the optimizer, which does not own it; pass "
                             "the model (AdamMini(model, weights=...)) so that the optimizer converts its parameters, "
                             "or convert them to bf16 yourself")
        if p.dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"{where}: its dtype is {p.dtype}; compact weights start from fp32 or bf16 parameters")
        if not p.is_contiguous():
            raise ValueError(f"{where}: it is not contiguous (strides {p.stride()})")
    for name, p in params:
        rem = cw.new_remainder(fmt, p)
        if p.dtype == torch.float32:
            wide = p.detach()
            low = torch.empty(p.shape, dtype=torch.bfloat16, device=p.device)
            cw.narrow_(low, rem, wide, mom.name_seed(name), 0)
            p.data = low
        if rem is not None:
            opt.state[p]["weight_remainder"] = rem
    if module is not None:
        for sub in module.modules():
            for key, b in sub._buffers.items():
                if b is not None and b.dtype == torch.float32:
                    sub._buffers[key] = b.to(torch.bfloat16)
    _annotate(opt, fmt)
    return fmt


def _annotate(opt: AdamMini, fmt: str | None) -> None:
    """The storage formats in the plan's options, so that ``print(opt.plan)`` counts their bytes (not
    while an in-run calibration owns the plan)."""
    extra = {k: v for k, v in (("weights", fmt), ("momentum", opt.momentum_format)) if v not in (None, "fp32")}
    if extra and opt.calibration is None:
        opt.plan = replace(opt.plan, options={**opt.plan.options, **extra})
