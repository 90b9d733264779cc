"""Saving and loading :class:`~blockopt.AdamMini`'s state: the plan travels with it, and a saved
state is checked against the optimizer before anything changes.

:meth:`AdamMini.state_dict <blockopt.AdamMini.state_dict>` and
:meth:`~blockopt.AdamMini.load_state_dict` call these functions; they read the optimizer through
its public extension points (``param_entries``, ``shard_infos``, ``zero_layouts``,
``calibration``, ``set_plan``) and the loading helpers of :class:`~blockopt.optim.base.PlanOptimizer`.
"""

from __future__ import annotations

import copy
import json
from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import torch

from ..distributed.dtensor import is_dtensor, local_tensor, make_shard_info, require_initialized
from ..distributed.state import gather_block_states, local_block_state, local_exp_avg
from ..kernels import momentum as mom
from ..partition import PlanEntry
from ..partition.plan import canonical_name

if TYPE_CHECKING:
    from .adam_mini import AdamMini

__all__ = ["after_setstate", "block_plan", "check_saved_plan", "load", "state_dict"]


def block_plan(entries: Iterable[PlanEntry]) -> list[str]:
    """A group's ``"block_plan"``: each parameter's plan entry as compact JSON, in the group's order."""
    return [json.dumps(e.to_dict(), sort_keys=True, separators=(",", ":")) for e in entries]


def state_dict(opt: AdamMini, sd: dict[str, Any]) -> dict[str, Any]:
    """torch.optim's state dict ``sd`` of ``opt``, completed: full second moments of sharded
    parameters (collective), the top-level ``"plan"``, the calibration state."""
    infos = opt.shard_infos
    sharded = [(i, p) for i, p in enumerate(opt.params_in_order())
               if infos.get(p) is not None and "block_exp_avg_sq" in opt.state.get(p, {})]
    if sharded:
        require_initialized(f"parameter {opt.param_entries[sharded[0][1]].name!r}")
        full = gather_block_states([opt.state[p]["block_exp_avg_sq"] for _, p in sharded],
                                   [infos[p] for _, p in sharded])
        for (i, _), v in zip(sharded, full):
            sd["state"][i] = {**sd["state"][i], "block_exp_avg_sq": v}
    entries = opt.param_entries
    sd["plan"] = {entries[p].name: entries[p].to_dict() for p in opt.params_in_order() if p in entries}
    if opt.calibration is not None and sd["param_groups"]:
        # in the groups, as block_plan is, so that it survives torch.distributed.checkpoint
        sd["param_groups"][0]["snr_calibration"] = opt.calibration.encoded_state()
    return sd


def load(opt: AdamMini, state_dict: Mapping[str, Any]) -> None:
    """:meth:`AdamMini.load_state_dict <blockopt.AdamMini.load_state_dict>`."""
    if not isinstance(state_dict, Mapping) or "state" not in state_dict or "param_groups" not in state_dict:
        raise ValueError("Invalid state_dict: expected a mapping with 'state' and 'param_groups'")
    if opt.zero_layouts:
        _load_zero(opt, state_dict)
        return
    groups = state_dict["param_groups"]
    saved = groups[0].get("snr_calibration") if groups and isinstance(groups[0], Mapping) else None
    calib = opt.calibration
    if calib is None:
        if saved is not None:
            raise ValueError("Invalid state_dict: it was saved by AdamMini(calibrate=...) (in-run SNR calibration); "
                             "build this optimizer with the same calibrate, calibrate_points and snr_cutoff")
        _load_checked(opt, state_dict)
        return
    if saved is None:
        raise ValueError("Invalid state_dict: this optimizer calibrates its blocks in the run (calibrate="
                         f"{calib.window}), but the state was saved without calibrate")
    calibration, chosen, steps = calib.check_state(saved)
    before = opt.plan
    # the saved phase's plan first, so that the checks compare against it; undone if anything fails
    opt.set_plan(chosen if chosen is not None else calib.calibrating_plan())
    try:
        _load_checked(opt, state_dict)
    except BaseException:
        opt.set_plan(before)
        raise
    calib.restore(calibration, chosen, steps)


def check_saved_plan(opt: AdamMini, saved_groups: Any, top_plan: Mapping[str, Any] | None = None
                     ) -> dict[Any, torch.Tensor]:
    """:meth:`AdamMini.check_saved_plan <blockopt.AdamMini.check_saved_plan>`."""
    opt._match_saved_groups({"state": {}, "param_groups": saved_groups})
    if top_plan is None and not all("block_plan" in g for g in saved_groups):
        raise ValueError(
            "Invalid state_dict: it has no plan (no 'block_plan' in its param_groups, no top-level 'plan'); "
            "it was not saved by blockopt.AdamMini"
        )
    id_map: dict[Any, torch.Tensor] = {}
    for gi, (group, saved) in enumerate(zip(opt.param_groups, saved_groups)):
        saved_names = saved.get("param_names", group["param_names"])
        group_plan = saved.get("block_plan")
        if group_plan is not None and len(group_plan) != len(saved["params"]):
            raise ValueError(
                f"Invalid state_dict: parameter group {gi} has {len(saved['params'])} parameters but "
                f"{len(group_plan)} plan entries"
            )
        for k, (name, saved_name, p, pid) in enumerate(
            zip(group["param_names"], saved_names, group["params"], saved["params"])
        ):
            entry = opt.param_entries[p]
            if canonical_name(saved_name) != canonical_name(name) and canonical_name(saved_name) not in entry.aliases:
                raise ValueError(
                    f"Invalid state_dict: parameter {len(id_map)} is {saved_name!r} in the saved state but "
                    f"{name!r} here"
                )
            if group_plan is not None:
                old = PlanEntry.from_dict(json.loads(group_plan[k]))
            elif saved_name in top_plan or canonical_name(saved_name) in top_plan:
                old = PlanEntry.from_dict(top_plan.get(saved_name) or top_plan[canonical_name(saved_name)])
            else:
                raise ValueError(f"Invalid state_dict: its plan has no entry for parameter {name!r}")
            if not old.same_blocks(entry):
                hint = ("; before 0.2.0, AdamMini(model) used the official rules: build it with rules='official' "
                        "to load such a state" if not old.snr_choice and "state budget" not in old.rule
                        and (entry.snr_choice or "state budget" in entry.rule) else "")
                if not hint and entry.kind == "factored" and old.snr_choice:
                    hint = ("; AdamMini(model) factors matrices since 0.2.0: a state saved with the built-in table's "
                            "blocks loads into rules='blocks'")
                raise ValueError(
                    f"state_dict was saved with a different partition plan: parameter {name!r} was "
                    f"{old.describe()} (shape {list(old.shape)}, decay {old.weight_decay}), here "
                    f"{entry.describe()} (shape {list(entry.shape)}, decay {entry.weight_decay}){hint}"
                )
            id_map[pid] = p
    return id_map


def _check_saved_momentum(opt: AdamMini, entry: PlanEntry, p: torch.Tensor, s: Mapping[str, Any]) -> None:
    """A saved first moment must be in this optimizer's storage format (checked before loading)."""
    fmt = mom.format_for(opt.momentum_format, tuple(p.shape))
    got = s["exp_avg"].dtype
    want = {"bf16": torch.bfloat16, "int8": torch.int8}.get(fmt)
    if (want is not None and got != want) or (want is None and got == torch.int8):
        saved_as = "int8" if got == torch.int8 else str(got)
        raise ValueError(
            f"Invalid state_dict: state of {entry.name!r} holds its first moment as {saved_as}, but this "
            f"optimizer stores it as {fmt} (momentum_dtype); build the optimizer with the momentum_dtype "
            "the state was saved with"
        )
    if fmt == "int8":
        scale = s.get("exp_avg_scale")
        if scale is None or tuple(scale.shape) != mom.scale_shape(tuple(p.shape)):
            raise ValueError(
                f"Invalid state_dict: state of {entry.name!r} has int8 momentum but exp_avg_scale "
                f"{None if scale is None else list(scale.shape)}; expected {list(mom.scale_shape(tuple(p.shape)))}"
            )


def _check_saved_sample(opt: AdamMini, entry: PlanEntry, s: Mapping[str, Any]) -> None:
    """A saved calibration sample (``snr_sample_index`` / ``snr_sample_v``) must be the one this
    optimizer's in-budget calibration draws for the tensor."""
    if "snr_sample_index" not in s and "snr_sample_v" not in s:
        return
    sample = opt.calibration.sample if opt.calibration is not None else None
    want = sample.index.get(entry.name) if sample is not None else None
    got, v = s.get("snr_sample_index"), s.get("snr_sample_v")
    if want is None or got is None or v is None or not torch.equal(got.cpu().to(torch.int64), want.to(torch.int64)) \
            or v.numel() != want.numel():
        raise ValueError(f"Invalid state_dict: the calibration sample saved for {entry.name!r} is not the one this "
                         "optimizer draws (another plan, calibrate_state or version); build the optimizer with the "
                         "arguments the state was saved with")


def _load_checked(opt: AdamMini, state_dict: Mapping[str, Any]) -> None:
    """Load a state saved by :meth:`~blockopt.AdamMini.state_dict` (or through
    ``torch.distributed.checkpoint``) after checking all of it against ``opt``'s current plan."""
    saved_groups = state_dict["param_groups"]
    id_map = check_saved_plan(opt, saved_groups, state_dict.get("plan"))
    infos = opt.shard_infos
    new_state: dict[torch.Tensor, dict[str, Any]] = {}
    for pid, s in state_dict["state"].items():
        if pid not in id_map:
            raise ValueError(f"Invalid state_dict: state for unknown parameter index {pid!r}")
        p = id_map[pid]
        entry = opt.param_entries[p]
        missing = {"step", "exp_avg", "block_exp_avg_sq"} - set(s)
        if missing:
            raise ValueError(f"Invalid state_dict: state of {entry.name!r} lacks {sorted(missing)}")
        _check_saved_momentum(opt, entry, p, s)
        _check_saved_sample(opt, entry, s)
        if tuple(s["exp_avg"].shape) != tuple(p.shape) or s["block_exp_avg_sq"].numel() != entry.num_blocks:
            raise ValueError(
                f"Invalid state_dict: state of {entry.name!r} has exp_avg {list(s['exp_avg'].shape)} and "
                f"{s['block_exp_avg_sq'].numel()} block values; expected {list(p.shape)} and {entry.num_blocks}"
            )
        new_state[p] = {
            k: (v.detach().clone().to(p.device) if isinstance(v, torch.Tensor) and k != "step"
                else v.detach().clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v))
            for k, v in s.items()
            if not (p in infos and k in ("exp_avg", "block_exp_avg_sq", "exp_avg_scale"))
        }
        if p in infos:
            info = infos[p]
            new_state[p]["exp_avg"] = local_exp_avg(s["exp_avg"], p)
            if "exp_avg_scale" in s:
                new_state[p]["exp_avg_scale"] = local_exp_avg(s["exp_avg_scale"], p, mom.scale_shape(tuple(p.shape)))
            full = s["block_exp_avg_sq"]
            v = local_block_state(full, info) if info is not None else full.detach().clone()
            new_state[p]["block_exp_avg_sq"] = v.to(local_tensor(p).device)
    groups = opt._restored_groups(saved_groups, keep=("block_plan",))
    state: Any = defaultdict(dict)
    state.update(new_state)
    opt.__setstate__({"state": state, "param_groups": groups})


def _load_zero(opt: AdamMini, state_dict: Mapping[str, Any]) -> None:
    """A state saved under the same ZeRO layout (world size, rank, partitions): checked, then loaded."""
    groups = state_dict["param_groups"]
    if len(groups) != len(opt.param_groups):
        raise ValueError(f"Invalid state_dict: it has {len(groups)} parameter groups, this optimizer has "
                         f"{len(opt.param_groups)}")
    id_map = {}
    for gi, (group, saved) in enumerate(zip(opt.param_groups, groups)):
        if saved.get("zero_layout") != group.get("zero_layout"):
            raise ValueError(
                f"Invalid state_dict: parameter group {gi} was saved under another DeepSpeed ZeRO layout "
                f"({str(saved.get('zero_layout'))[:80]!r}...); here {str(group.get('zero_layout'))[:80]!r}... "
                "Load it at the world size it was saved at (resharding ZeRO-1/2 AdamMini state is not supported)"
            )
        id_map.update(zip(saved["params"], group["params"]))
    new_state = {}
    for pid, s in state_dict["state"].items():
        p = id_map[pid]
        layout = opt.zero_layouts[p]
        if tuple(s["exp_avg"].shape) != tuple(p.shape) or s["block_exp_avg_sq"].numel() != layout.num_v:
            raise ValueError(f"Invalid state_dict: a ZeRO partition's state has exp_avg {list(s['exp_avg'].shape)} "
                             f"and {s['block_exp_avg_sq'].numel()} block values; expected {list(p.shape)} and "
                             f"{layout.num_v}")
        new_state[p] = {k: v.detach().clone().to(p.device) if k != "step" else v.detach().clone()
                        for k, v in s.items()}
    restored = opt._restored_groups(groups, keep=("block_plan", "zero_layout"))
    state: Any = defaultdict(dict)
    state.update(new_state)
    torch.optim.Optimizer.__setstate__(opt, {"state": state, "param_groups": restored})


def after_setstate(opt: AdamMini, has_plan: bool) -> None:
    """What :meth:`AdamMini.__setstate__ <blockopt.AdamMini.__setstate__>` adds to torch.optim's: after a
    copy or a pickle (``has_plan``), the parameter -> entry map and the shard infos are rebuilt, the
    ZeRO layout and the routes start empty; states pickled by older versions get today's defaults."""
    for name, default in (("routes", {}), ("_zero", {}), ("_zero_group", None), ("weights", None)):
        if not hasattr(opt, name):  # a copy or a pickle: what is rebuilt, or starts empty
            setattr(opt, name, default)
    opt._prepared_cache = {}
    opt._state_epoch = getattr(opt, "_state_epoch", 0) + 1
    if not hasattr(opt, "momentum_format"):  # pickled before compact momentum existed
        opt.momentum_format = "fp32"
    if not hasattr(opt, "_calib"):  # pickled before in-run calibration existed
        opt._calib = None
    for group in opt.param_groups:
        for key, default in (("foreach", None), ("fused", None), ("capturable", False), ("maximize", False)):
            group.setdefault(key, default)
    if has_plan:
        opt._entries = {p: opt.plan[n] for g in opt.param_groups for n, p in zip(g["param_names"], g["params"])}
        opt._dtensors = {p: make_shard_info(p, e.geometry, e.name) for p, e in opt._entries.items() if is_dtensor(p)}
    for group in opt.param_groups:
        if "block_plan" not in group:
            group["block_plan"] = block_plan(opt._entries[p] for p in group["params"])
