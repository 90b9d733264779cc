"""Blockwise LR: param groups whose peak learning rates follow the sharpness of each block type.

Wang et al. ("The Sharpness Disparity Principle in Transformers for Accelerating
Language Model Pre-Training", ICML 2025; ``docs/algorithms.md`` section 5) find that the
average sharpness of a Transformer's blocks is ordered
``Emb << QK < FFN < VO << Norm`` from early in training on, and scale the peak
learning rate of each block type by a fixed multiplier inside the usual warmup +
cosine schedule: Norm x1, VO x4, FFN x6, QK x8, Emb x10.

:func:`blockwise_lr_groups` turns a :class:`~blockopt.PartitionPlan`'s roles into
such param groups. The base learning rate ``lr`` is the Norm one; every group's
``lr`` is ``lr * multiplier``, so any scheduler that scales each group's own
initial learning rate (``LambdaLR``, ``SequentialLR`` of warmup + cosine,
``CosineAnnealingLR``...) keeps the ratios. ``OneCycleLR`` sets every group's
peak from its ``max_lr`` argument: pass one per group,
``max_lr=[g["lr"] for g in groups]``.

Role -> block type (the plan's roles, see :class:`~blockopt.PlanEntry`):

=====================  ==========  =====================================================
plan role              block type  why
=====================  ==========  =====================================================
embedding              embedding   the token embedding (tied or not)
output                 embedding   an untied output head: a vocabulary table like the
                                   embedding (the paper's Emb covers both)
position_embedding     embedding   a learned position table is an embedding layer (a
                                   lookup, one row per position), GPT-2's ``wpe``
query, key             qk
value, attn_out        vo
qkv (fused)            vo          one tensor can carry one learning rate: a fused QKV
                                   weight gets the *smallest* multiplier among its parts
                                   (query/key -> qk, value -> vo), vo with the paper's
                                   numbers, because the sharpest part (value) bounds
                                   the step the whole tensor can take
mlp                    ffn         stacked experts too (they are MLPs)
router                 ffn         a mixture-of-experts router ``[E, hidden]``: part
                                   of the feed-forward block it routes
norm                   norm
bias, 1-D ``other``    norm        vectors (biases, gates, scalars) stay at the base
                                   learning rate, like norm weights: the conservative
                                   choice, the paper gives them no multiplier of their own
anything else          error       ``conv`` weights, unknown >= 2-D tensors, unknown
                                   roles: no silent default; name them with
                                   ``overrides={pattern: block_type}``
=====================  ==========  =====================================================

Each group holds one block type and one weight-decay decision (the plan's:
decay where ``PlanEntry.weight_decay``), and records ``block_type`` and
``lr_multiplier``. ``blockopt bench`` sets ``group["lr"] = lr_now *
group["lr_multiplier"]`` each step.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from ..partition import PartitionPlan, partition
from ..partition.rules import check_patterns_matched, compile_override_pattern

__all__ = ["BLOCKWISE_LR_MULTIPLIERS", "BLOCK_TYPES", "blockwise_block_types", "blockwise_lr_groups"]

#: the block types, in group order
BLOCK_TYPES = ("embedding", "qk", "vo", "ffn", "norm")

#: the paper's tuned multipliers of the base (Norm) learning rate
BLOCKWISE_LR_MULTIPLIERS: Mapping[str, float] = MappingProxyType(
    {"embedding": 10.0, "qk": 8.0, "vo": 4.0, "ffn": 6.0, "norm": 1.0}
)

_ROLE_TO_TYPE = {
    "embedding": "embedding",
    "output": "embedding",
    "position_embedding": "embedding",
    "query": "qk",
    "key": "qk",
    "value": "vo",
    "attn_out": "vo",
    "mlp": "ffn",
    "router": "ffn",
    "norm": "norm",
    "bias": "norm",
}


def _check_multipliers(multipliers: Mapping[str, Any] | None) -> dict[str, float]:
    out = dict(BLOCKWISE_LR_MULTIPLIERS)
    if multipliers is None:
        return out
    if not isinstance(multipliers, Mapping):
        raise ValueError(  # noqa: TRY004 - bad input is a ValueError naming the argument (house rule)
            f"Invalid multipliers: {multipliers!r}; expected a mapping from block type "
            f"({', '.join(BLOCK_TYPES)}) to a positive number"
        )
    for key, value in multipliers.items():
        if key not in BLOCK_TYPES:
            raise ValueError(
                f"Invalid multipliers key: {key!r}; allowed block types: {', '.join(BLOCK_TYPES)}"
            )
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if (isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value))
                or value <= 0):
            raise ValueError(
                f"Invalid multipliers[{key!r}]: {value!r}; expected a finite number > 0"
            )
        out[key] = float(value)
    return out


def _check_overrides(overrides: Mapping[str, str] | None) -> list[tuple[str, re.Pattern[str], str]]:
    if overrides is None:
        return []
    if not isinstance(overrides, Mapping):
        raise ValueError(f"Invalid overrides: {overrides!r}; expected a mapping {{name pattern: block type}}")  # noqa: TRY004 - bad input is a ValueError naming the argument (house rule)
    parsed = []
    for pattern, block_type in overrides.items():
        regex = compile_override_pattern(pattern)
        if block_type not in BLOCK_TYPES:
            raise ValueError(
                f"Invalid overrides[{pattern!r}]: {block_type!r}; allowed block types: {', '.join(BLOCK_TYPES)}"
            )
        parsed.append((pattern, regex, block_type))
    return parsed


def _type_of(entry, multipliers: Mapping[str, float]) -> str | None:
    role = entry.role
    if role == "qkv":
        parts = entry.parts or ("query", "key", "value")
        types = [_ROLE_TO_TYPE.get(p) for p in parts]
        if None in types:
            return None
        return min(dict.fromkeys(types), key=lambda t: multipliers[t])  # ties: the first part's type
    if role == "other":
        return "norm" if len(entry.shape) <= 1 else None
    return _ROLE_TO_TYPE.get(role)


def _resolve(model_or_named_params: Any, plan: PartitionPlan | None) -> tuple[list[tuple[str, torch.Tensor]], PartitionPlan]:
    if isinstance(model_or_named_params, nn.Module):
        named = list(model_or_named_params.named_parameters())
        if plan is None:
            plan = partition(model_or_named_params)
    else:
        if plan is None:
            raise ValueError(
                "Invalid plan: None. Block types come from the plan's roles: pass the model, or named "
                "parameters with plan=blockopt.partition(model)"
            )
        if isinstance(model_or_named_params, (torch.Tensor, str, bytes)) or not isinstance(
                model_or_named_params, Iterable):
            raise ValueError(  # noqa: TRY004 - bad input is a ValueError naming the argument (house rule)
                f"Invalid model_or_named_params: {type(model_or_named_params).__name__}; expected an nn.Module "
                "or (name, tensor) pairs such as model.named_parameters()"
            )
        named = []
        for item in model_or_named_params:
            if (not isinstance(item, tuple) or len(item) != 2 or not isinstance(item[0], str)
                    or not isinstance(item[1], torch.Tensor)):
                raise ValueError(
                    f"Invalid model_or_named_params: item {item!r:.80} is not a (name, tensor) pair; pass "
                    "model.named_parameters(), not model.parameters()"
                )
            named.append(item)
    if not isinstance(plan, PartitionPlan):
        raise ValueError(f"Invalid plan: expected a blockopt.PartitionPlan, got {type(plan).__name__}")  # noqa: TRY004 - bad input is a ValueError naming the argument (house rule)
    return named, plan


def blockwise_block_types(
    model_or_named_params: nn.Module | Iterable[tuple[str, torch.Tensor]],
    *,
    plan: PartitionPlan | None = None,
    multipliers: Mapping[str, float] | None = None,
    overrides: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Parameter name -> block type (``embedding``, ``qk``, ``vo``, ``ffn``, ``norm``).

    The mapping :func:`blockwise_lr_groups` uses, for inspection. Arguments as there.
    Raises ``ValueError`` listing every parameter that has no block type.
    """
    mults = _check_multipliers(multipliers)
    rules = _check_overrides(overrides)
    named, plan = _resolve(model_or_named_params, plan)
    return _block_types(named, plan, mults, rules)


def _block_types(named, plan, mults, rules) -> dict[str, str]:
    out: dict[str, str] = {}
    unknown, missing = [], []
    matched = {pattern: 0 for pattern, _, _ in rules}
    for name, p in named:
        if name not in plan:
            missing.append(name)
            continue
        entry = plan[name]
        btype = _type_of(entry, mults)
        all_names = (name, entry.name, *entry.aliases)
        for pattern, regex, forced in rules:  # later patterns win
            if any(regex.fullmatch(n) for n in all_names):
                matched[pattern] += 1
                btype = forced
        if btype is None:
            unknown.append(f"{name} (role {entry.role!r}, shape {list(entry.shape)})")
            continue
        out[name] = btype
    if missing:
        raise ValueError(
            f"Invalid plan: parameter(s) {missing[:5]}{' ...' if len(missing) > 5 else ''} are not in the plan "
            f"(it has {len(plan)} entries); build the plan from the same model"
        )
    check_patterns_matched(matched, [n for n, _ in named])
    if unknown:
        raise ValueError(
            f"Blockwise LR has no block type for {len(unknown)} parameter(s): {'; '.join(unknown)}. "
            f"Known roles: {', '.join(sorted(_ROLE_TO_TYPE))}, qkv, 1-D other. Assign them with "
            f"overrides={{name pattern: block type}} (block types: {', '.join(BLOCK_TYPES)})"
        )
    return out


def blockwise_lr_groups(
    model_or_named_params: nn.Module | Iterable[tuple[str, torch.Tensor]],
    lr: float,
    *,
    plan: PartitionPlan | None = None,
    multipliers: Mapping[str, float] | None = None,
    weight_decay: float = 0.0,
    overrides: Mapping[str, str] | None = None,
    named: bool = True,
) -> list[dict[str, Any]]:
    """Param groups with the Blockwise LR multipliers (Wang et al., 2025) on their peak learning rates.

    Args:
        model_or_named_params: an ``nn.Module`` (its plan is built with
            :func:`blockopt.partition` unless ``plan`` is given), or ``(name,
            tensor)`` pairs such as ``model.named_parameters()`` (then ``plan`` is
            required). Every parameter is placed, frozen ones included.
        lr: the base learning rate, the Norm block's; each group gets
            ``lr * multiplier``.
        plan: the :class:`~blockopt.PartitionPlan` whose roles decide the block
            types (see the module docstring for the table) and whose
            ``weight_decay`` flags split each type into a decayed and a
            non-decayed group.
        multipliers: ``{block type: multiplier}`` replacing some of
            :data:`BLOCKWISE_LR_MULTIPLIERS` (``embedding`` 10, ``qk`` 8, ``vo`` 4,
            ``ffn`` 6, ``norm`` 1). Unknown keys and multipliers that are not
            finite numbers > 0 raise ``ValueError``.
        weight_decay: the weight decay of the decayed groups (the others get 0).
        overrides: ``{pattern: block type}``; a pattern full-matches a parameter
            name (or an alias of a tied one), later patterns win; a pattern that
            matches nothing is an error. Needed for tensors no role maps
            (convolutions, unknown >= 2-D tensors), which otherwise raise.
        named: ``True``: groups hold ``(name, tensor)`` pairs, for
            ``blockopt.AdamMini(groups, plan=plan)``; ``False``: plain tensors, for
            ``torch.optim.AdamW`` and the like.

    Returns:
        One group per (block type, weight decay) present, in the order embedding,
        qk, vo, ffn, norm, decayed before not: ``{"params", "lr", "weight_decay",
        "block_type", "lr_multiplier"}``.

    Example::

        >>> import torch, blockopt
        >>> model = blockopt.models.build_model("llama-tiny")
        >>> plan = blockopt.partition(model)
        >>> groups = blockopt.blockwise_lr_groups(model, 1e-3, plan=plan, weight_decay=0.1)
        >>> [(g["block_type"], g["lr"]) for g in groups]          # peak lr = 1e-3 x the block type's multiplier
        [('embedding', 0.01), ('qk', 0.008), ('vo', 0.004), ('ffn', 0.006), ('norm', 0.001)]
        >>> opt = blockopt.AdamMini(groups, plan=plan, betas=(0.9, 0.95))
        >>> # or: torch.optim.AdamW(blockopt.blockwise_lr_groups(model, 1e-3, plan=plan, named=False))
        >>> warmup = torch.optim.lr_scheduler.LinearLR(opt, 0.01, 1.0, total_iters=100)
        >>> cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=900)
        >>> sched = torch.optim.lr_scheduler.SequentialLR(opt, [warmup, cosine], milestones=[100])
    """
    if isinstance(lr, torch.Tensor) and lr.numel() == 1:
        lr = lr.item()
    if isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not math.isfinite(float(lr)) or lr < 0:
        raise ValueError(f"Invalid lr: {lr!r}; expected a finite float >= 0")
    if (isinstance(weight_decay, bool) or not isinstance(weight_decay, numbers.Real)
            or not math.isfinite(float(weight_decay)) or weight_decay < 0):
        raise ValueError(f"Invalid weight_decay: {weight_decay!r}; expected a finite float >= 0")
    if not isinstance(named, bool):
        raise ValueError(f"Invalid named: {named!r}; expected True or False")  # noqa: TRY004 - bad input is a ValueError naming the argument (house rule)
    mults = _check_multipliers(multipliers)
    rules = _check_overrides(overrides)
    params, plan = _resolve(model_or_named_params, plan)
    types = _block_types(params, plan, mults, rules)

    buckets: dict[tuple[str, bool], list[Any]] = {}
    for name, p in params:
        key = (types[name], plan[name].weight_decay)
        buckets.setdefault(key, []).append((name, p) if named else p)
    groups = []
    for btype in BLOCK_TYPES:
        for decay in (True, False):
            items = buckets.get((btype, decay))
            if items:
                groups.append({
                    "params": items,
                    "lr": float(lr) * mults[btype],
                    "weight_decay": float(weight_decay) if decay else 0.0,
                    "block_type": btype,
                    "lr_multiplier": mults[btype],
                })
    return groups
