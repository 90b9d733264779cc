"""Checks of :class:`~blockopt.AdamMini`'s options: each bad value is a ``ValueError`` naming it."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from ..kernels import momentum as mom
from ..kernels.blocks import is_factored
from ..kernels.dispatch import triton_enabled
from ..partition import PlanEntry
from ..partition.snr import check_cutoff
from .base import check_hparams

__all__ = ["CALIBRATE_STATES", "check_calibrate_args", "check_factored", "check_factored_zero", "check_options"]


#: how the calibration window keeps its second moments: inside the state budget, or AdamW's whole state
CALIBRATE_STATES = ("budget", "adamw")


def check_calibrate_args(calibrate: Any, points: Any, cutoff: Any, state: Any = "budget") -> tuple[int, int, float]:
    if isinstance(calibrate, bool) or not isinstance(calibrate, int) or calibrate < 1:
        raise ValueError(f"Invalid calibrate: {calibrate!r}; expected a positive int (the number of steps before "
                         "the switch to the SNR plan), or None")
    if state not in CALIBRATE_STATES:
        raise ValueError(f"Invalid calibrate_state: {state!r}; allowed: 'budget' (the window stays inside the "
                         "state budget; SNR from a sample) or 'adamw' (the window keeps AdamW's per-element state)")
    if points is None:
        points = min(4, calibrate)
    if isinstance(points, bool) or not isinstance(points, int) or not 1 <= points <= calibrate:
        raise ValueError(f"Invalid calibrate_points: {points!r}; expected an int in [1, calibrate={calibrate}]")
    return calibrate, points, check_cutoff(cutoff)


def check_options(defaults: dict[str, Any], state_dtype: Any, momentum_dtype: Any, calibrate: Any,
                   calibrate_points: Any, snr_cutoff: Any, calibrate_state: Any) -> tuple[int, int, float] | None:
    """Every option of :class:`AdamMini` checked (``ValueError`` naming it); the calibration's
    arguments, or ``None`` without ``calibrate``."""
    calib = None
    capturable = defaults["capturable"]
    if calibrate is not None:
        calib = check_calibrate_args(calibrate, calibrate_points, snr_cutoff, calibrate_state)
        if capturable:
            raise ValueError("Invalid calibrate with capturable=True: the switch to the SNR plan changes the "
                             "state's shapes, which a recorded CUDA graph cannot follow")
    check_hparams(defaults)
    if state_dtype is not None and (not isinstance(state_dtype, torch.dtype) or not state_dtype.is_floating_point):
        raise ValueError(f"Invalid state_dtype: {state_dtype!r}; expected a floating torch.dtype or None")
    if mom.momentum_format(momentum_dtype) != "fp32" and capturable:
        raise ValueError(f"Invalid momentum_dtype={momentum_dtype!r} with capturable=True: the capturable "
                         "(CUDA graph) step keeps fp32 momentum")
    if mom.momentum_format(momentum_dtype) != "fp32" and state_dtype not in (None, torch.float32):
        raise ValueError(f"Invalid momentum_dtype={momentum_dtype!r} with state_dtype={state_dtype}: compact "
                         "momentum is decoded to fp32 for the update; use state_dtype=None or torch.float32")
    for name in ("foreach", "fused", "maximize", "capturable"):
        if defaults[name] is not None and not isinstance(defaults[name], bool):
            raise ValueError(f"Invalid {name}: {defaults[name]!r}; expected True, False or None")
    if defaults["fused"] and defaults["foreach"] is False:
        raise ValueError("Invalid fused=True with foreach=False: choose one implementation")
    if capturable and not triton_enabled():
        raise RuntimeError("capturable=True needs the Triton step on CUDA: pip install 'blockopt[gpu]' (and "
                           "leave BLOCKOPT_DISABLE_TRITON unset)")
    return calib


_BLOCKS_INSTEAD = ("build the optimizer with rules='blocks' (the same built-in table and budget, blocks only) or "
                   "rules='official'")


def check_factored(entry: PlanEntry, name: str | None, *, dtensor: bool, capturable: bool) -> None:
    """A factored entry has no sharded (FSDP2) or capturable step yet: ``ValueError`` naming the way out."""
    if is_factored(entry.geometry) and (dtensor or capturable):
        where = "a DTensor (FSDP2)" if dtensor else "stepped with capturable=True"
        raise ValueError(f"Invalid plan for {name!r}: its second moment is factored (the default for matrices), "
                         f"which is not supported yet when the parameter is {where}; {_BLOCKS_INSTEAD}")


def check_factored_zero(entries: Iterable[PlanEntry]) -> None:
    """DeepSpeed ZeRO's flat partitions have no factored step yet: ``ValueError`` naming the way out."""
    factored = [e.name for e in entries if is_factored(e.geometry)]
    if factored:
        raise ValueError(f"Invalid plan for DeepSpeed ZeRO: {len(factored)} parameter(s) (first {factored[0]!r}) "
                         "have factored second moments (the default for matrices), which ZeRO's flat partitions "
                         f"do not support yet; {_BLOCKS_INSTEAD}")
