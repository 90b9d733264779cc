"""What every optimizer built on a partition plan shares: finding each parameter's plan entry by
name, checking hyperparameters, and checking a saved state against this optimizer before loading.

:class:`PlanOptimizer` is the base of :class:`~blockopt.AdamMini` and :class:`~blockopt.MoFO`. A
subclass says what a group must hold (:meth:`PlanOptimizer._check_group`) and what it keeps per
parameter (:meth:`PlanOptimizer._register`); the base does the bookkeeping around them: a group
that fails a check is removed again, so a bad group never half-joins the optimizer.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
from torch import nn

from ..partition import PartitionPlan, PlanEntry, partition
from ..partition.budget import apply_state_budget, check_state_budget, state_ratio
from ..partition.plan import canonical_name
from ..partition.rules import user_kind_names

__all__ = ["PlanOptimizer", "check_float", "check_hparams", "params_and_plan"]


def check_float(name: str, value: Any, *, low: float = 0.0, high: float | None = None, high_open: bool = True) -> None:
    """``ValueError`` naming ``name`` and the value unless it is a finite float in the range."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"Invalid {name}: a tensor {name} must have one element, got shape {list(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"Invalid {name}: {value!r}; expected a float")  # noqa: TRY004 - bad input is a ValueError naming the argument (house rule)
    ok = value >= low and math.isfinite(value)
    if high is not None:
        ok = ok and (value < high if high_open else value <= high)
    if not ok:
        allowed = f">= {low}" if high is None else f"in [{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"Invalid {name}: {value}; expected a finite float {allowed}")


def check_hparams(group: Mapping[str, Any]) -> None:
    """lr, betas, eps and weight_decay of a parameter group (torch.optim's Adam family)."""
    check_float("lr", group["lr"])
    betas = group["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"Invalid betas: {betas!r}; expected a pair (beta1, beta2)")
    for i, b in enumerate(betas):
        try:
            check_float(f"beta parameter at index {i}", b, high=1.0)
        except ValueError as e:
            raise ValueError(f"{e} (betas={tuple(betas)!r})") from None
    check_float("eps", group["eps"])
    check_float("weight_decay", group["weight_decay"])


#: ``rules=``: "builtin" (the default: the built-in SNR table, matrices factored, within a state budget),
#: "blocks" (the same table and budget, blocks only: what FSDP2 and ZeRO step), "official" (the official
#: release's structural rules)
RULES = ("builtin", "blocks", "official")
BUILTIN_TABLE_RULES = ("builtin", "blocks")

#: the state budget of the default plan (``rules="builtin"``) and of an in-budget calibration
DEFAULT_STATE_BUDGET = 0.55


class PlanOptions(NamedTuple):
    """:func:`plan_options`' answer."""

    extra: dict[str, Any]  # extra blockopt.partition arguments
    rules: str | None  # the rules in force (None: the given plan decides)
    budget: float | None  # the state budget (None: none)
    strict: bool  # the budget was given: a plan that cannot fit is an error (else a warning)


def plan_options(rules: Any, state_budget: Any, plan: PartitionPlan | None, calibrate: Any,
                 calibrate_state: Any = "budget", *, is_module: bool = True,
                 value_single_block: bool = False) -> PlanOptions:
    """What ``rules`` and ``state_budget`` mean for this optimizer, checked: the extra
    :func:`blockopt.partition` arguments (empty when ``plan`` is given, so that named parameters with
    ``plan=`` stay accepted, with ``calibrate``, which builds its own plans, and for parameters, which need
    ``plan=``), the rules in force,
    the state budget and whether it was given.

    Defaults: ``rules=None`` is ``"builtin"`` for a model; ``state_budget="auto"`` is
    :data:`DEFAULT_STATE_BUDGET` with the built-in rules or an in-budget calibration, none otherwise,
    and a model whose plan cannot fit in it keeps that plan (:func:`soft_budget` warns).
    """
    if rules is not None and rules not in RULES:
        raise ValueError(f"Invalid rules: {rules!r}; allowed: {', '.join(map(repr, RULES))}, or None (the default: "
                         "'builtin' for a model; a given plan decides for itself)")
    if rules is not None and rules != "official" and plan is not None and calibrate is None:
        raise ValueError(f"Invalid rules={rules!r} with plan=: the plan already decides every block; build it with "
                         "blockopt.partition(model, snr='builtin')")
    if rules is None and plan is None:
        rules = "builtin"
    if value_single_block and rules in BUILTIN_TABLE_RULES and is_module and plan is None:
        raise ValueError(f"Invalid value_single_block=True with rules={rules!r}: the built-in SNR table "
                         "decides the value projection's blocks; pass rules='official' to use the official rules "
                         "with one block per value projection")
    in_budget = calibrate is not None and calibrate_state == "budget"
    strict = not (isinstance(state_budget, str) and state_budget == "auto")
    if not strict:
        budget = DEFAULT_STATE_BUDGET if rules in BUILTIN_TABLE_RULES or in_budget else None
    else:
        budget = check_state_budget(state_budget)
        if budget is not None and calibrate is not None and not in_budget:
            raise ValueError("Invalid state_budget with calibrate_state='adamw': that calibration window keeps one "
                             "second moment per element (AdamW's state), so no budget below 1 holds during it; "
                             "use calibrate_state='budget'")
    if budget is None and in_budget:
        raise ValueError("Invalid state_budget=None with calibrate: an in-budget calibration needs a budget "
                         f"(e.g. {DEFAULT_STATE_BUDGET}); or pass calibrate_state='adamw'")
    if calibrate is not None:
        return PlanOptions({}, rules, budget, strict)
    table = rules in BUILTIN_TABLE_RULES and plan is None and is_module
    extra = {**({"snr": "builtin"} if table else {}), **({"factored": True} if table and rules == "builtin" else {}),
             **({"state_budget": budget} if budget is not None and strict else {})}
    return PlanOptions(extra, rules, budget, strict)


def soft_budget(plan: PartitionPlan, budget: float, what: str) -> PartitionPlan:
    """The default budget: spent on ``plan`` when it fits; otherwise ``plan`` as it is, with a
    ``UserWarning`` (a model of many small tensors whose blocks alone need more)."""
    ratio = state_ratio(plan)
    if ratio <= budget:
        return apply_state_budget(plan, budget, keep=frozenset(user_kind_names(plan)))
    warnings.warn(f"{what}: this model's plan alone keeps {ratio:.3f}x of AdamW's optimizer state, above the "
                  f"default state budget ({budget}x); it is used as it is. print(opt.plan) shows each tensor's "
                  "blocks; rules='official' gives the official blocks", stacklevel=3)
    return plan


def params_and_plan(model_or_params: Any, plan: PartitionPlan | None, hints: Mapping[str, Any], *,
                    plan_required: bool, missing_plan: str) -> tuple[Any, PartitionPlan | None]:
    """The param groups and the plan of an optimizer built on a partition plan.

    A module gives one group of its named parameters and, unless ``plan`` is
    passed, a plan built from it with ``hints`` (the :func:`blockopt.partition`
    arguments). Parameters or groups are used as given; hints are then an
    error, and so is a missing plan when ``plan_required`` (``missing_plan`` is
    the message).
    """
    if isinstance(model_or_params, nn.Module):
        named = list(model_or_params.named_parameters())
        if not named:
            raise ValueError(f"Invalid model: {type(model_or_params).__name__} has no parameters "
                             "(the optimizer got an empty parameter list)")
        if plan is None:
            plan = partition(model_or_params, **hints)
        params: Any = [{"params": named}]
    else:
        used = [k for k, v in hints.items() if v and not (k == "state_budget" and plan is not None)]
        if used:
            raise ValueError(
                f"Invalid arguments {used} with named parameters: partition hints are used only when a "
                f"module is given; pass the model, or build the plan with blockopt.partition(model, ...) "
                f"and pass plan="
            )
        if plan is None and plan_required:
            raise ValueError(missing_plan)
        params = model_or_params
    if plan is not None and not isinstance(plan, PartitionPlan):
        raise ValueError(f"Invalid plan: expected a blockopt.PartitionPlan, got {type(plan).__name__}")
    if plan is not None and hints.get("state_budget") is not None and "state_budget" not in plan.options:
        plan = apply_state_budget(plan, hints["state_budget"])  # a given plan, within the budget
    return params, plan


class PlanOptimizer(torch.optim.Optimizer):
    """A ``torch.optim.Optimizer`` whose parameters are found in a :class:`PartitionPlan` by name."""

    plan: PartitionPlan | None

    # --- construction -----------------------------------------------------------------------------
    def _check_group(self, group: dict[str, Any]) -> None:
        """Hyperparameter checks of a group (subclasses add theirs)."""
        check_hparams(group)

    def _register(self, group: dict[str, Any], names: list[str | None]) -> None:
        """Record what the optimizer keeps per parameter of a checked group (may raise ``ValueError``)."""

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; with a plan its parameters must be named (``(name, tensor)`` pairs or ``param_names``)."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            self._check_group(group)
            names = group.get("param_names")
            if self.plan is not None and names is None:
                raise ValueError(
                    f"Invalid params: {type(self).__name__} finds each parameter in the plan by name; pass "
                    "model.named_parameters() (or (name, tensor) pairs in each group), not model.parameters()"
                )
            for i, p in enumerate(group["params"]):
                if p.is_sparse:
                    what = repr(names[i]) if names is not None else f"parameter {i}"
                    raise ValueError(f"Invalid params: {what} is a sparse tensor; {type(self).__name__} needs "
                                     "dense parameters")
            self._register(group, list(names) if names is not None else [None] * len(group["params"]))
        except (ValueError, RuntimeError):
            self.param_groups.pop()
            raise

    def entry_for(self, name: str, p: torch.Tensor) -> PlanEntry:
        """The plan entry of parameter ``name`` (``ValueError`` if it is missing or of another shape)."""
        assert self.plan is not None
        if name not in self.plan:
            raise ValueError(
                f"Invalid params: parameter {name!r} is not in the plan (plan has {len(self.plan)} entries); "
                "build the plan from the same model"
            )
        entry = self.plan[name]
        if tuple(p.shape) != entry.shape:
            raise ValueError(
                f"Invalid plan: parameter {name!r} has shape {list(p.shape)} but the plan entry has {list(entry.shape)}"
            )
        return entry

    def params_in_order(self) -> list[torch.Tensor]:
        """Every parameter, group by group, in the order of ``state_dict()["state"]``'s indices."""
        return [p for g in self.param_groups for p in g["params"]]

    # --- loading ------------------------------------------------------------------------------------
    def _match_saved_groups(self, state_dict: Any) -> dict[Any, torch.Tensor]:
        """Saved parameter id -> parameter, after checking the saved groups' count and sizes (the
        error names the parameters on each side when the names are saved)."""
        if not isinstance(state_dict, Mapping) or "state" not in state_dict or "param_groups" not in state_dict:
            raise ValueError("Invalid state_dict: expected a mapping with 'state' and 'param_groups'")
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"Invalid state_dict: it has {len(saved_groups)} parameter groups, this optimizer has "
                f"{len(self.param_groups)}"
            )
        id_map: dict[Any, torch.Tensor] = {}
        for gi, (group, saved) in enumerate(zip(self.param_groups, saved_groups)):
            if len(group["params"]) != len(saved["params"]):
                raise ValueError(
                    f"Invalid state_dict: parameter group {gi} has {len(saved['params'])} parameters, this "
                    f"optimizer's has {len(group['params'])}"
                    f"{name_difference(saved.get('param_names'), group.get('param_names') or [])}"
                )
            id_map.update(zip(saved["params"], group["params"]))
        return id_map

    def _restored_groups(self, saved_groups: list[Mapping[str, Any]], keep: tuple[str, ...] = ()) -> list[dict]:
        """This optimizer's groups with the saved hyperparameters (checked); ``params``,
        ``param_names`` and the keys in ``keep`` stay this optimizer's."""
        groups = []
        for group, saved in zip(self.param_groups, saved_groups):
            own = ("params", "param_names", *keep)
            new_group = {k: copy.deepcopy(v) for k, v in saved.items() if k not in own and k != "snr_calibration"}
            new_group.update({k: group[k] for k in own if k in group})
            self._check_group(new_group)
            groups.append(new_group)
        return groups


def name_difference(saved: Any, ours: list[str]) -> str:
    """``; only here: ['x'], only in the saved state: ['y'] (...)`` on canonical names, or '' without names."""
    if not isinstance(saved, (list, tuple)):
        return ""
    a, b = [canonical_name(n) for n in saved], [canonical_name(n) for n in ours]
    here, there = [n for n in b if n not in set(a)], [n for n in a if n not in set(b)]
    parts = ([f"only here: {here[:5]}"] if here else []) + ([f"only in the saved state: {there[:5]}"] if there else [])
    return ("; " + ", ".join(parts) + " (a frozen or new parameter? build the optimizer over the same parameters)"
            if parts else "")
