"""Checkpoints with ``torch.distributed.checkpoint`` (DCP): save at one world size, load at any other.

The plain DCP recipe works with :class:`blockopt.AdamMini` as with any torch
optimizer::

    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict, get_optimizer_state_dict, set_model_state_dict, set_optimizer_state_dict)
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    dcp.save(state, checkpoint_id=path)                        # at world size N
    ...
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    dcp.load(state, checkpoint_id=path)                        # at world size M
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, opt, state["optim"])       # checks the partition plan

``exp_avg`` is a DTensor (DCP reshards it); ``block_exp_avg_sq`` is saved as
the full vector (written once; each rank keeps its range on load); the plan
travels as ``param_groups[i]["block_plan"]``. One gap in the plain recipe:
when the checkpoint was written under a plan with a *different number of
blocks* for some parameter, ``dcp.load`` itself fails first, with DCP's
"Size mismatch ... block_exp_avg_sq" message. :func:`load` (or
:func:`check_plan` before ``dcp.load``) reads the saved plan alone first and
raises AdamMini's ``ValueError`` naming the parameter instead. For
``AdamMini(calibrate=N)`` they also put a freshly built optimizer into the
checkpoint's calibration phase (calibrating, or switched to its SNR plan), whose
state shapes differ: use :func:`load` (or :func:`check_plan`) there.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from torch import nn

__all__ = ["check_plan", "load", "save"]


def save(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer,
         extra: dict[str, Any] | None = None) -> None:
    """DCP-save ``{"model", "optim", **extra}`` under ``path`` (collective: call on every rank)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer),
             **(extra or {})}
    dcp.save(state, checkpoint_id=str(path))


def check_plan(path: str | os.PathLike, optimizer: torch.optim.Optimizer, key: str = "optim") -> None:
    """Raise ``ValueError`` (naming the parameter) if the checkpoint's plan differs from ``optimizer``'s.

    Reads only the ``block_plan`` strings of the checkpoint's param groups.
    """
    import torch.distributed.checkpoint as dcp

    if not hasattr(optimizer, "check_saved_plan"):
        raise TypeError(f"check_plan needs a blockopt optimizer, got {type(optimizer).__name__}")
    if getattr(optimizer, "calibration", None) is not None:
        # AdamMini(calibrate=N): take the checkpoint's phase first, so that the plan (and the shapes of the
        # template DCP loads into) are the saved ones
        calib_probe = {key: {"param_groups": [{"snr_calibration": ""}]}}
        try:
            dcp.load(calib_probe, checkpoint_id=str(path))
        except Exception as e:
            raise ValueError(
                f"Invalid checkpoint {os.fspath(path)!r}: this optimizer calibrates its blocks in the run "
                f"(calibrate=...), but the checkpoint has no calibration state under {key!r} (saved without "
                f"calibrate?)") from e
        optimizer.calibration.enter_saved_phase(optimizer, calib_probe[key]["param_groups"][0]["snr_calibration"])
    probe = {key: {"param_groups": [{"block_plan": list(g["block_plan"])} for g in optimizer.param_groups]}}
    try:
        dcp.load(probe, checkpoint_id=str(path))
    except Exception as e:  # DCP wraps per-rank errors; a missing key means no (or fewer) plan groups
        raise ValueError(
            f"Invalid checkpoint {os.fspath(path)!r}: cannot read the partition plan of its {len(probe[key]['param_groups'])} "
            f"optimizer parameter group(s) under {key!r} (was it saved from blockopt.AdamMini, with the "
            f"same parameter groups?): {str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__}"
        ) from e
    saved_groups = []
    for g in probe[key]["param_groups"]:
        names = [json.loads(e)["name"] for e in g["block_plan"]]
        saved_groups.append({"params": names, "param_names": names, "block_plan": g["block_plan"]})
    optimizer.check_saved_plan(saved_groups)  # type: ignore[attr-defined]


def load(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer,
         extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save` (any world size) into ``model`` and ``optimizer``.

    The plan is checked first (:func:`check_plan`); ``extra`` is a template of
    further entries to load (returned filled in). Collective: call on every rank.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    if hasattr(optimizer, "check_saved_plan"):
        check_plan(path, optimizer)
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer),
             **(extra or {})}
    dcp.load(state, checkpoint_id=str(path))
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optim"])
    return {k: state[k] for k in (extra or {})}
