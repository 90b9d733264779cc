"""In-run SNR calibration for :class:`~blockopt.AdamMini` (``calibrate=N``).

For the first ``N`` steps every tensor keeps one second moment per element
(the step is AdamW's); at ``points`` evenly spaced steps of the second half of that window the SNR
of each tensor's ``v`` along its candidate partitions is measured
(:mod:`blockopt.partition.snr`). After step ``N`` the plan switches to the SNR
plan: each tensor's new block value is the mean of its full ``v`` over the
block, so nothing measured is thrown away, and the full ``v`` is freed.

Under FSDP2 each measurement and the switch gather one tensor's full ``v`` at a
time (``all_reduce`` of its per-element vector; peak memory: the largest
tensor's ``v``), so every rank computes exactly what one process computes.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch

from ..distributed.state import gather_block_states
from ..kernels.blocks import Geometry, block_views
from ..partition import PartitionPlan, PlanEntry
from ..partition.budget import state_ratio
from ..partition.snr import SNRCalibration, SNRMeter, apply_snr, candidates, check_cutoff, measure_steps

if TYPE_CHECKING:
    from .adam_mini import AdamMini

__all__ = ["InRunCalibration", "check_calibrate_args", "compress_to_blocks", "full_second_moments",
           "user_kind_names"]


def check_calibrate_args(calibrate: Any, points: Any, cutoff: Any) -> tuple[int, int, float]:
    if isinstance(calibrate, bool) or not isinstance(calibrate, int) or calibrate < 1:
        raise ValueError(f"Invalid calibrate: {calibrate!r}; expected a positive int (the number of steps that keep "
                         "AdamW's per-element second moment before the switch to the SNR plan), or None")
    if points is None:
        points = min(4, calibrate)
    if isinstance(points, bool) or not isinstance(points, int) or not 1 <= points <= calibrate:
        raise ValueError(f"Invalid calibrate_points: {points!r}; expected an int in [1, calibrate={calibrate}]")
    return calibrate, points, check_cutoff(cutoff)


def user_kind_names(plan: PartitionPlan) -> set[str]:
    """Names whose blocks an ``overrides`` entry with a ``kind`` decided (recorded in ``plan.options``)."""
    from ..partition.rules import compile_override_pattern, parse_override

    out: set[str] = set()
    for pattern, spec in dict(plan.options.get("overrides") or {}).items():
        if "kind" not in parse_override(pattern, spec):
            continue
        regex = compile_override_pattern(pattern)
        out.update(e.name for e in plan.entries if any(regex.fullmatch(n) for n in (e.name, *e.aliases)))
    return out


def compress_to_blocks(v: torch.Tensor, shape: tuple[int, ...], geometry: Geometry) -> torch.Tensor:
    """The mean of a per-element ``v`` over each block of ``geometry`` (1-D, in ``v``'s dtype)."""
    full = v.detach().reshape(shape).to(torch.float64)
    if not full.is_contiguous():
        full = full.contiguous()
    means = [view.reshape(view.shape[0], -1).mean(dim=1) for view in block_views(full, geometry)]
    return torch.cat(means).to(v.dtype)


def _element_entry(e: PlanEntry, window: int) -> PlanEntry:
    return replace(e, geometry=Geometry(-1, ((e.numel, 1),)), parts=(),
                   rule=f"calibrating: per element (AdamW) for the first {window} steps")


class InRunCalibration:
    """The calibration phase of one optimizer: the structural plan, the meter, the switch."""

    def __init__(self, structural: PartitionPlan, window: int, points: int, cutoff: float) -> None:
        self.structural = structural
        self.window, self.points, self.cutoff = window, points, cutoff
        self.keep = user_kind_names(structural)
        self.meter = SNRMeter(structural, source={"in_run": True, "window": window})
        self.steps_done = 0
        self.chosen: PartitionPlan | None = None

    @property
    def phase(self) -> str:
        return "calibrating" if self.chosen is None else "done"

    def measure_at(self) -> list[int]:
        return measure_steps(self.window, self.points)

    def calibrating_plan(self) -> PartitionPlan:
        """The structural plan with every tensor that has candidates (and no user kind) per element."""
        new = {e.name: _element_entry(e, self.window) for e in self.structural.entries
               if candidates(e) and e.name not in self.keep}
        return self.structural.replace_entries(new)

    def active_plan(self) -> PartitionPlan:
        return self.chosen if self.chosen is not None else self.calibrating_plan()

    # --- the optimizer's full v (gathered under FSDP2: full_second_moments) -----------------------
    def after_step(self, opt: AdamMini) -> None:
        if self.chosen is not None:
            return
        self.steps_done += 1
        if self.steps_done in self.measure_at():
            vs = {}
            for entry, _, v in full_second_moments(opt):
                if entry.name in self.keep or not candidates(entry) or v.numel() != entry.numel:
                    continue
                vs[entry.name] = v
            self.meter.measure(self.steps_done, vs)
        if self.steps_done >= self.window:
            self.switch(opt)

    def switch(self, opt: AdamMini) -> None:
        """Choose the SNR plan and compress every per-element v to its blocks (block means)."""
        chosen = apply_snr(self.structural, self.meter.calibration, self.cutoff, keep=self.keep)
        new_v: dict[torch.Tensor, torch.Tensor] = {}
        for entry, p, v in list(full_second_moments(opt)):
            target = chosen[entry.name]
            if target.geometry != entry.geometry:
                new_v[p] = compress_to_blocks(v, entry.shape, target.geometry)
        self.chosen = chosen
        opt.set_plan(chosen, new_v)
        warn_if_above_half(chosen, "AdamMini(calibrate=...): after the switch, the SNR plan")

    # --- state -------------------------------------------------------------------------------
    def to_state(self) -> dict[str, Any]:
        return {"phase": self.phase, "window": self.window, "points": self.points, "cutoff": self.cutoff,
                "steps_done": self.steps_done, "calibration": self.meter.calibration.to_dict(),
                "plan": self.chosen.to_dict() if self.chosen is not None else None}

    def encoded_state(self) -> str:
        """:meth:`to_state` as the one string a checkpoint keeps (``param_groups[0]["snr_calibration"]``)."""
        return encode_state(self.to_state())

    def check_state(self, saved: Mapping[str, Any] | str) -> tuple[SNRCalibration, PartitionPlan | None, int]:
        """Validate a saved :meth:`to_state` (or :meth:`encoded_state`) against this calibration; nothing changes."""
        saved = decode_state(saved)
        if not isinstance(saved, Mapping) or saved.get("phase") not in ("calibrating", "done"):
            raise ValueError("Invalid state_dict: its 'snr_calibration' entry is not one AdamMini(calibrate=...) "
                             "wrote")
        for key, mine in (("window", self.window), ("points", self.points), ("cutoff", self.cutoff)):
            if saved.get(key) != mine:
                raise ValueError(f"Invalid state_dict: it was saved with calibrate {key} {saved.get(key)!r}, this "
                                 f"optimizer has {mine!r}; build it with the same calibrate arguments")
        calibration = SNRCalibration.from_dict(saved["calibration"])
        calibration.check_plan(self.structural)
        plan = PartitionPlan.from_dict(saved["plan"]) if saved.get("plan") is not None else None
        if plan is not None:
            mine = {e.name: (e.shape, e.weight_decay) for e in self.structural.entries}
            theirs = {e.name: (e.shape, e.weight_decay) for e in plan.entries}
            if theirs != mine:
                bad = sorted(n for n in set(mine) | set(theirs) if mine.get(n) != theirs.get(n))
                raise ValueError(f"Invalid state_dict: its SNR plan does not fit this optimizer's parameters "
                                 f"(shape or weight decay differs for {bad[:3]})")
        steps = int(saved["steps_done"])
        if not 0 <= steps <= self.window:
            raise ValueError(f"Invalid state_dict: calibration step {steps} outside [0, {self.window}]")
        return calibration, plan, steps

    def enter_saved_phase(self, opt: AdamMini, saved: Any) -> None:
        """Put ``opt`` (whose calibration this is) into the phase, and plan, of a saved ``snr_calibration``
        entry, before a ``torch.distributed.checkpoint`` load builds its template (see
        :func:`blockopt.distributed.checkpoint.load`). Only an optimizer without state can change phase;
        nothing changes on error."""
        _, chosen, _ = self.check_state(saved)
        target = chosen if chosen is not None else self.calibrating_plan()
        if target.entries == opt.plan.entries:
            return
        if any(opt.state.get(p) for p in opt.params_in_order()):
            raise ValueError(
                f"Invalid checkpoint: it was saved in calibration phase {decode_state(saved)['phase']!r}, this "
                f"optimizer is in phase {self.phase!r} and holds state; load it into a freshly built optimizer")
        opt.set_plan(target)

    def restore(self, calibration: SNRCalibration, plan: PartitionPlan | None, steps: int) -> None:
        self.meter.calibration = calibration
        self.chosen = plan
        self.steps_done = steps


#: the largest state, as a fraction of fp32 AdamW's, that this library calls "half memory"
HALF_MEMORY = 0.55


def warn_if_above_half(plan: PartitionPlan, what: str) -> float:
    """Warn (``UserWarning``) when ``plan``'s fp32 state is above :data:`HALF_MEMORY` of AdamW's: tensors
    that no candidate fits keep one value per element. Returns the ratio."""
    ratio = state_ratio(plan)
    if ratio > HALF_MEMORY:
        per_element = [e.name for e in plan.entries if e.trainable and e.kind == "element" and e.numel > 1]
        warnings.warn(
            f"{what} keeps {ratio:.2f}x of AdamW's optimizer state, above half ({HALF_MEMORY}x): "
            f"{len(per_element)} tensors keep one second moment per element (e.g. {per_element[:3]}). "
            "A longer calibration window, a lower snr_cutoff, or snr='builtin' gives fewer; print(opt.plan) "
            "shows each tensor's blocks", stacklevel=3)
    return ratio


def full_second_moments(opt: AdamMini) -> Iterator[tuple[PlanEntry, torch.Tensor, torch.Tensor]]:
    """``(plan entry, parameter, full block_exp_avg_sq)`` of every parameter of ``opt`` with state, in
    the optimizer's order (the same on every rank); a sharded parameter's vector is gathered from all
    ranks (collective), one parameter at a time."""
    infos = opt.shard_infos
    for p in opt.params_in_order():
        state = opt.state.get(p)
        if not state or "block_exp_avg_sq" not in state:
            continue
        v = state["block_exp_avg_sq"]
        if infos.get(p) is not None:
            (v,) = gather_block_states([v], [infos[p]])
        yield opt.param_entries[p], p, v


def encode_state(state: Mapping[str, Any]) -> str:
    return json.dumps(state)


def decode_state(text: Any) -> Mapping[str, Any]:
    if isinstance(text, str):
        return json.loads(text)
    return text
