"""A state budget: per-element second moments for the tensors whose blocks are least constant, until
the optimizer state reaches a given fraction of AdamW's.

Adam-mini's state is ``m`` (one value per weight) plus one ``v`` per block, about half of AdamW's
``m`` and ``v``. A budget of ``0.55`` leaves room for ``0.1 x`` the parameter count in extra second
moments. :func:`apply_state_budget` spends it greedily, one whole tensor at a time, on the tensors
whose blocks are least constant:

1. tensors whose blocks were chosen from data, by the SNR of their chosen partition, lowest first
   (a low SNR means the block's elements disagree most about their second moment);
2. then tensors decided by rule, in :data:`BUDGET_ROLE_ORDER` (the output layer and the embedding
   first: one scale per layer works only when these keep per-parameter adaptivity, Zhao et al.,
   ICLR 2025), larger SNR gains unknown, so smaller tensors first within a role.

A tensor that does not fit in what is left is skipped and the next one tried. Every entry the budget
changed says so in its ``rule``; the plan's ``options["state_budget"]`` records the budget and
``print(plan)`` shows what it bought.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

from ..kernels.blocks import Geometry
from .plan import PartitionPlan, PlanEntry

__all__ = ["BUDGET_ROLE_ORDER", "apply_state_budget", "check_state_budget", "state_ratio"]

#: the order in which rule-decided tensors get per-element second moments under a budget
BUDGET_ROLE_ORDER = ("output", "embedding", "position_embedding", "norm", "bias", "value", "attn_out", "key",
                     "query", "qkv", "mlp", "router", "conv", "other")


def check_state_budget(budget: Any, argument: str = "state_budget") -> float | None:
    """``None``, or a float in (0.5, 1]; anything else is a ``ValueError`` naming the argument."""
    if budget is None:
        return None
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not math.isfinite(budget) \
            or not 0.5 < budget <= 1:
        raise ValueError(f"Invalid {argument}: {budget!r}; expected a number in (0.5, 1], the largest optimizer "
                         "state allowed as a fraction of fp32 AdamW's (e.g. 0.55), or None")
    return float(budget)


def state_ratio(plan: PartitionPlan) -> float:
    """The plan's fp32 state as a fraction of fp32 AdamW's."""
    adamw = plan.adamw_state_bytes()
    return plan.state_bytes() / adamw if adamw else 0.0


def _snr_of_choice(e: PlanEntry) -> float | None:
    snr = dict(e.snr)
    return snr.get(e.snr_choice) if e.snr_choice else None


def _order(e: PlanEntry) -> tuple:
    snr = _snr_of_choice(e)
    if snr is not None and math.isfinite(snr):
        return (0, snr, e.numel, e.name)
    role = e.role if e.role in BUDGET_ROLE_ORDER else "other"
    return (1, BUDGET_ROLE_ORDER.index(role), e.numel, e.name)


def apply_state_budget(plan: PartitionPlan, budget: float, *, keep: set[str] | frozenset[str] = frozenset()) \
        -> PartitionPlan:
    """``plan`` with per-element second moments for its least constant tensors while the fp32 state
    stays at or under ``budget`` x AdamW's. ``keep``: names whose blocks the user set (overrides).

    Raises ``ValueError`` (naming the figures) when ``plan`` itself is above the budget.
    """
    budget = check_state_budget(budget)
    n = plan.num_params
    ratio = state_ratio(plan)  # what a budget must at least allow
    if ratio > budget + 1e-12:
        raise ValueError(f"Invalid state_budget: {budget!r}; this model's plan needs at least {ratio:.4f}x of "
                         f"AdamW's state ({plan.num_blocks:,} second-moment values for {n:,} parameters); "
                         f"allowed: a number in [{ratio:.4f}, 1]")
    # state in values: n (m) + blocks (v); AdamW: 2n
    room = math.floor(budget * 2 * n + 1e-9) - (n + plan.num_blocks)
    new: dict[str, PlanEntry] = {}
    for e in sorted((e for e in plan.trained if e.kind != "element" and e.name not in keep), key=_order):
        extra = e.numel - e.num_blocks
        if extra <= 0 or extra > room:
            continue
        room -= extra
        why = f"SNR {_snr_of_choice(e):.2f} of {e.snr_choice}" if _snr_of_choice(e) is not None else f"role {e.role}"
        new[e.name] = replace(e, geometry=Geometry(-1, ((e.numel, 1),)), parts=(),
                              rule=f"state budget {budget:g}: per element ({why}; was {e.describe()})")
    out = plan.replace_entries(new)
    return replace(out, options={**out.options, "state_budget": budget})
