"""In-run SNR calibration for :class:`~blockopt.AdamMini` (``calibrate=N``).

Two ways to spend the window of ``N`` steps (``calibrate_state``):

* ``"budget"`` (the default): the optimizer steps with its own plan inside the state budget (the
  budget less the share its sample takes), and an :class:`~blockopt.optim.snr_sample.SNRSample` keeps
  AdamW's second moment on a bounded random sample of elements only (at most 2 % of AdamW's state),
  from which the SNR of every candidate partition is measured. The state never exceeds the budget.
* ``"adamw"``: every tensor keeps one second moment per element for the window (the step is AdamW's,
  and so is the state: twice Adam-mini's), and the SNR is measured on that full ``v``.

At ``points`` evenly spaced steps of the second half of the window the SNRs are recorded
(:mod:`blockopt.partition.snr`). After step ``N`` the plan switches to the SNR plan (within the budget
in the first way: the tensors whose blocks are least constant get per-element ``v`` while it lasts).
Each tensor's new block value is the mean over the block of what it held, so nothing measured is
thrown away.

Under FSDP2 the sample is summed over ranks with one ``all_reduce`` per step, and each measurement and
the switch gather one tensor's ``v`` at a time, so every rank computes exactly what one process
computes.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch

from ..distributed.state import gather_block_states
from ..kernels.blocks import Geometry, block_views
from ..partition import PartitionPlan, PlanEntry
from ..partition.budget import apply_state_budget, state_ratio
from ..partition.rules import user_kind_names
from ..partition.snr import SNRCalibration, SNRMeter, apply_snr, candidates, measure_steps, snr_entry
from .snr_sample import SNRSample

if TYPE_CHECKING:
    from .adam_mini import AdamMini

__all__ = ["InRunCalibration", "carry_block_means", "compress_to_blocks", "full_second_moments", "snr_plan_within"]

def compress_to_blocks(v: torch.Tensor, shape: tuple[int, ...], geometry: Geometry) -> torch.Tensor:
    """The mean of a per-element ``v`` over each block of ``geometry`` (1-D, in ``v``'s dtype)."""
    full = v.detach().reshape(shape).to(torch.float64)
    if not full.is_contiguous():
        full = full.contiguous()
    means = [view.reshape(view.shape[0], -1).mean(dim=1) for view in block_views(full, geometry)]
    return torch.cat(means).to(v.dtype)


def carry_block_means(v: torch.Tensor, shape: tuple[int, ...], old: Geometry, new: Geometry) -> torch.Tensor:
    """Block values under ``new`` from block values ``v`` under ``old``: each new block gets the mean,
    over its elements, of the old value of the block each element was in. Holds one float64 copy of
    the tensor's shape while it works."""
    if old == new:
        return v.detach().clone()
    full = torch.empty(shape, dtype=torch.float64, device=v.device)
    off = 0
    for view in block_views(full, old):
        nb = view.shape[0]
        view.copy_(v[off:off + nb].to(torch.float64).reshape(nb, *[1] * (view.dim() - 1)).expand_as(view))
        off += nb
    return compress_to_blocks(full, shape, new).to(v.dtype)


def snr_plan_within(structural: PartitionPlan, calibration: SNRCalibration, cutoff: float, budget: float,
                    keep: set[str], fallback: PartitionPlan) -> PartitionPlan:
    """The SNR plan of ``structural`` (:func:`~blockopt.partition.snr.apply_snr`) inside ``budget``.

    Tensors with no candidate above ``cutoff`` get per-element ``v`` while the budget allows, the
    ones whose best candidate is most constant going back to that candidate first; any room left
    then buys per-element ``v`` for the least constant blocks (:func:`apply_state_budget`). A tensor
    with no finite SNR keeps its ``fallback`` entry (the window's). Where every tensor in blocks is
    still above ``budget``, that plan is returned (the caller says so)."""
    chosen = apply_snr(structural, calibration, cutoff, keep=keep)
    over = (chosen.num_params + chosen.num_blocks) - math.floor(budget * 2 * chosen.num_params + 1e-9)
    if over > 0:
        def best(e: PlanEntry) -> float:
            return max((x for x in calibration.mean(e.name).values() if math.isfinite(x)), default=-math.inf)

        new: dict[str, PlanEntry] = {}
        for e in sorted((e for e in chosen.entries if e.snr_choice == "element" and e.name not in keep),
                        key=lambda e: (-best(e), e.name)):
            if over <= 0:
                break
            alt = snr_entry(structural[e.name], calibration.mean(e.name), -math.inf)
            if alt.kind == "element":
                alt = fallback[e.name]
            else:
                alt = replace(alt, rule=f"SNR: best {alt.snr_choice} {best(e):.2f} <= {cutoff:g}, in blocks to stay "
                                        f"within the state budget {budget:g}")
            if e.num_blocks > alt.num_blocks:
                new[e.name] = alt
                over -= e.num_blocks - alt.num_blocks
        chosen = chosen.replace_entries(new)
    if over > 0:  # every tensor in blocks and still above: the caller warns
        return chosen
    return apply_state_budget(chosen, budget, keep=keep)


def _element_entry(e: PlanEntry, window: int) -> PlanEntry:
    return replace(e, geometry=Geometry(-1, ((e.numel, 1),)), parts=(),
                   rule=f"calibrating: per element (AdamW) for the first {window} steps")


class InRunCalibration:
    """The calibration phase of one optimizer: the window's plan, the measurements, the switch.

    ``structural`` gives every tensor's candidates; ``rules`` (``"builtin"`` or ``"blocks"``: the built-in table, blocks only; ``"official"``; or
    ``None`` for a given plan) and ``budget`` the window's plan when ``state`` is ``"budget"``.
    """

    def __init__(self, structural: PartitionPlan, window: int, points: int, cutoff: float, *,
                 state: str = "adamw", rules: str | None = None, budget: float | None = None,
                 strict: bool = True) -> None:
        self.structural = structural
        self.window, self.points, self.cutoff = window, points, cutoff
        self.state, self.budget, self.strict = state, budget, strict
        self.keep = user_kind_names(structural)
        source = {"in_run": True, "window": window, **({"method": "sampled"} if state == "budget" else {})}
        self.meter = SNRMeter(structural, source=source)
        self.steps_done = 0
        self.chosen: PartitionPlan | None = None
        self.sample: SNRSample | None = None
        if state == "budget":
            self.sample = SNRSample(structural, (e.name for e in structural.trained if e.name not in self.keep))
            self.window_plan = self._window_plan(rules)

    def _window_plan(self, rules: str | None) -> PartitionPlan:
        """The plan the window steps with: ``rules``' plan inside the budget less the sample's share."""
        assert self.budget is not None and self.sample is not None
        base = apply_snr(self.structural, "builtin", keep=self.keep) if rules in ("builtin", "blocks") \
            else self.structural
        share = self.sample.nbytes / self.structural.adamw_state_bytes()
        need = state_ratio(base)
        room = math.floor((self.budget - share) * 1000) / 1000
        if room < need and not self.strict:  # the default budget on a model whose plan alone is above it
            warnings.warn(f"AdamMini(calibrate=...): this model's plan alone keeps {need:.3f}x of AdamW's optimizer "
                          f"state, above the default state budget ({self.budget}x) less the SNR sample "
                          f"({share:.3f}x); the window uses it as it is", stacklevel=4)
            return base
        if room < need:
            raise ValueError(
                f"Invalid state_budget: {self.budget!r}; calibrating inside it needs {need:.4f}x of AdamW's state "
                f"for the plan plus {share:.4f}x for the SNR sample; allowed: a number in "
                f"[{math.ceil((need + share) * 1000) / 1000:g}, 1], or calibrate_state='adamw'")
        return apply_state_budget(base, room, keep=self.keep) if room > 0.5 else base

    @property
    def phase(self) -> str:
        return "calibrating" if self.chosen is None else "done"

    def measure_at(self) -> list[int]:
        return measure_steps(self.window, self.points)

    def calibrating_plan(self) -> PartitionPlan:
        """The window's plan: inside the budget, or (``state="adamw"``) the structural plan with every
        tensor that has candidates (and no user kind) per element."""
        if self.state == "budget":
            return self.window_plan
        new = {e.name: _element_entry(e, self.window) for e in self.structural.entries
               if candidates(e) and e.name not in self.keep}
        return self.structural.replace_entries(new)

    def active_plan(self) -> PartitionPlan:
        return self.chosen if self.chosen is not None else self.calibrating_plan()

    def after_step(self, opt: AdamMini) -> None:
        if self.chosen is not None:
            return
        self.steps_done += 1
        if self.sample is not None:
            self.sample.update(opt)
            if self.steps_done in self.measure_at():
                self.meter.calibration.add(self.steps_done, self.sample.estimates(opt))
        elif self.steps_done in self.measure_at():
            vs = {}
            for entry, _, v in full_second_moments(opt):  # gathered under FSDP2
                if entry.name in self.keep or not candidates(entry) or v.numel() != entry.numel:
                    continue
                vs[entry.name] = v
            self.meter.measure(self.steps_done, vs)
        if self.steps_done >= self.window:
            self.switch(opt)

    def switch(self, opt: AdamMini) -> None:
        """Choose the SNR plan and carry every second moment to its new blocks (block means)."""
        calibration = self.meter.calibration
        if self.state == "budget":
            assert self.budget is not None
            chosen = snr_plan_within(self.structural, calibration, self.cutoff, self.budget, self.keep,
                                     self.window_plan)
            if state_ratio(chosen) > self.budget + 1e-12:  # blocks alone above it (a model of small tensors)
                warnings.warn(f"AdamMini(calibrate=...): after the switch, the SNR plan keeps "
                              f"{state_ratio(chosen):.3f}x of AdamW's optimizer state with every tensor in blocks, "
                              f"above the state budget ({self.budget}x)", stacklevel=4)
        else:
            chosen = apply_snr(self.structural, calibration, self.cutoff, keep=self.keep)
        new_v: dict[torch.Tensor, torch.Tensor] = {}
        for entry, p, v in list(full_second_moments(opt, changed_in=chosen)):
            new_v[p] = carry_block_means(v, entry.shape, entry.geometry, chosen[entry.name].geometry)
        SNRSample.free(opt)
        self.chosen = chosen
        opt.set_plan(chosen, new_v)
        if self.state != "budget":
            warn_if_above_half(chosen, "AdamMini(calibrate=..., calibrate_state='adamw'): after the switch, the "
                                       "SNR plan")

    # --- state -------------------------------------------------------------------------------
    def to_state(self) -> dict[str, Any]:
        return {"phase": self.phase, "window": self.window, "points": self.points, "cutoff": self.cutoff,
                "window_state": self.state, "state_budget": self.budget, "steps_done": self.steps_done, "calibration": self.meter.calibration.to_dict(),
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
        saved_state = saved.get("window_state", "adamw")  # the only way before 0.2.0
        if saved_state != self.state:
            raise ValueError(f"Invalid state_dict: it was saved with calibrate_state={saved_state!r}, this optimizer "
                             f"has calibrate_state={self.state!r}; build it with calibrate_state={saved_state!r}")
        for key, mine in (("window", self.window), ("points", self.points), ("cutoff", self.cutoff),
                          ("state_budget", self.budget)):
            if saved.get(key) != mine and not (key == "state_budget" and saved_state == "adamw"):
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
        if chosen is not None:  # switched: a template step must not measure (nor draw the sample)
            self.chosen = chosen
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


def full_second_moments(opt: AdamMini, changed_in: PartitionPlan | None = None
                        ) -> Iterator[tuple[PlanEntry, torch.Tensor, torch.Tensor]]:
    """``(plan entry, parameter, full block_exp_avg_sq)`` of every parameter of ``opt`` with state, in
    the optimizer's order (the same on every rank); a sharded parameter's vector is gathered from all
    ranks (collective), one parameter at a time. ``changed_in``: only the parameters whose blocks
    differ there."""
    infos = opt.shard_infos
    for p in opt.params_in_order():
        state = opt.state.get(p)
        if not state or "block_exp_avg_sq" not in state:
            continue
        if changed_in is not None and changed_in[opt.param_entries[p].name].geometry == opt.param_entries[p].geometry:
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
