"""The optimizers ``blockopt bench`` can compare: name -> factory, and which extra provides each.

Every factory receives the model, the learning rate and one :class:`Hyper` (the
shared hyperparameters of the sweep, with per-optimizer options applied), so
every optimizer sees the same weight-decay mask (the one Adam-mini's partition
plan decides: matrices and embeddings decay, norms and biases do not), the same
betas where the algorithm has them, and the same learning-rate schedule (set
by the runner through ``param_groups[i]["lr"]``).

A spec string is a name with optional options, ``name:key=value:key=value``,
e.g. ``adam-mini:value_single_block=true`` or ``adamw:beta2=0.99``; keys are
checked against the optimizer's options.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from ..optim.extra import CautiousAdamW, ChainedOptimizer
from .errors import BenchInputError

__all__ = [
    "REGISTRY",
    "CautiousAdamW",
    "ChainedOptimizer",
    "Hyper",
    "OptimizerChoice",
    "OptimizerSpec",
    "available",
    "build_optimizer",
    "parse_optimizer",
]


@dataclass(frozen=True)
class Hyper:
    """Hyperparameters shared by the optimizers of one sweep (``lr`` comes separately)."""

    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    value_single_block: bool = False
    momentum_dtype: str = "fp32"  # Adam-mini's first-moment storage: fp32, bf16 or int8
    calibrate: float = 0.2  # adam-mini-snr: calibration window, a fraction of the run (< 1) or steps (>= 1)
    snr_cutoff: float = 1.0  # adam-mini-snr: the SNR a candidate partition must exceed
    rules: str = "official"  # adam-mini: how its plan is built (AdamMini(rules=...))
    state_budget: float = 0.0  # adam-mini: AdamMini(state_budget=...); 0 means none (adam-mini-default: 0.55)
    calibrate_state: str = "budget"  # adam-mini-snr: the window inside the state budget, or AdamW's state
    step_in_backward: bool = False  # adam-mini(-default): blockopt.step_in_backward (clip by the previous norm)
    weights: str = "fp32"  # adam-mini(-default): AdamMini(weights=...), compact bf16 weights (fp32: as they are)
    run_steps: int = 0  # the run's length, set by the runner (not an option)

    def calibrate_steps(self) -> int:
        """The calibration window in steps: ``calibrate`` x the run when below 1, else ``calibrate``."""
        n = round(self.calibrate * self.run_steps) if self.calibrate < 1 else int(self.calibrate)
        if self.run_steps and not 1 <= n < self.run_steps:
            raise BenchInputError(
                f"--optimizers: calibrate={self.calibrate:g} gives a calibration window of {n} steps; expected "
                f"1 <= window < --steps ({self.run_steps}): a fraction in (0, 1) or a number of steps")
        return max(1, n)


@dataclass(frozen=True)
class ModelInfo:
    """What some optimizers need to know about the model's attention shape."""

    d_model: int
    n_heads: int
    n_kv_heads: int


@dataclass(frozen=True)
class OptimizerSpec:
    name: str
    label: str  # for tables: "AdamW", "Adam-mini"
    factory: Callable[..., torch.optim.Optimizer]
    default_lr: float
    description: str
    package: str | None = None  # import name of the package it needs, if any
    pip_name: str | None = None
    extra: str | None = None  # blockopt extra that installs it
    options: tuple[str, ...] = ("beta1", "beta2", "eps", "weight_decay")

    def missing(self) -> str | None:
        """``None`` when usable, else the one-line reason (names the extra to install)."""
        if self.package is None:
            return None
        try:
            importlib.import_module(self.package)
        except ImportError:
            return (f"optimizer {self.name!r} needs the package {self.pip_name or self.package!r}: "
                    f"pip install 'blockopt[{self.extra}]'")
        return None


@dataclass(frozen=True)
class OptimizerChoice:
    """One entry of ``--optimizers``: a spec and its options (``key`` is the text as given, canonicalised)."""

    spec: OptimizerSpec
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        if not self.options:
            return self.spec.name
        return self.spec.name + "".join(f":{k}={_fmt_opt(v)}" for k, v in sorted(self.options.items()))

    @property
    def label(self) -> str:
        if not self.options:
            return self.spec.label
        return self.spec.label + " (" + ", ".join(f"{k}={_fmt_opt(v)}" for k, v in sorted(self.options.items())) + ")"

    def hyper(self, base: Hyper) -> Hyper:
        return replace(base, **self.options)


def _fmt_opt(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return f"{v:g}" if isinstance(v, float) else str(v)


# --- helpers -------------------------------------------------------------------------
def _decay_groups(model: nn.Module, plan, hp: Hyper, *, named: bool = False) -> list[dict[str, Any]]:
    """Two param groups: decayed (as the plan says) and not, with the sweep's weight decay."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        flag = plan[name].weight_decay if name in plan else p.dim() >= 2
        item = (name, p) if named else p
        (decay if flag else no_decay).append(item)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": hp.weight_decay})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def _fastest_adamw(groups, **kw) -> torch.optim.AdamW:
    """AdamW with its fused implementation where torch has one for these tensors (CPU and CUDA
    since torch 2.4): the default on CPU is a per-tensor loop about 10x slower, which would make
    any optimizer look fast beside it. Plain tensors beside DTensors (tensor parallel, whose embeddings
    stay whole) take the per-tensor loop: torch's fused and foreach kernels refuse the mix."""
    params = [p for g in groups for p in (g["params"] if isinstance(g, dict) else [g])]
    kinds = {type(p.data).__name__ == "DTensor" for p in params}
    if len(kinds) > 1:
        return torch.optim.AdamW(groups, foreach=False, **kw)
    try:
        return torch.optim.AdamW(groups, fused=True, **kw)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(groups, **kw)


def _adamw(model, lr, hp, plan, info):
    return _fastest_adamw(_decay_groups(model, plan, hp), lr=lr, betas=(hp.beta1, hp.beta2), eps=hp.eps,
                          weight_decay=hp.weight_decay)


def _adam_mini(model, lr, hp, plan, info):
    from ..optim import AdamMini

    # the runner's plan (built from the unsharded model before any FSDP2/DDP wrapping) when it was built
    # with this variant's value_single_block; otherwise AdamMini builds its own from the model
    if plan is not None and (bool(plan.options.get("value_single_block", False)) != hp.value_single_block
                             or hp.rules != "official"):
        plan = None
    return AdamMini(model, lr=lr, betas=(hp.beta1, hp.beta2), eps=hp.eps, weight_decay=hp.weight_decay,
                    value_single_block=hp.value_single_block, plan=plan,
                    momentum_dtype=None if hp.momentum_dtype == "fp32" else hp.momentum_dtype, rules=hp.rules,
                    state_budget=hp.state_budget or None, weights=_weights(hp))


def _adam_mini_default(model, lr, hp, plan, info):
    from ..optim import AdamMini

    # AdamMini(model): the built-in SNR table, matrices factored, within the state budget (0.55 unless
    # given); adam-mini-default:rules=blocks is the same without factoring
    return AdamMini(model, lr=lr, betas=(hp.beta1, hp.beta2), eps=hp.eps, weight_decay=hp.weight_decay,
                    momentum_dtype=None if hp.momentum_dtype == "fp32" else hp.momentum_dtype,
                    state_budget=hp.state_budget or "auto", rules=None if hp.rules == "official" else hp.rules,
                    weights=_weights(hp))


def _weights(hp: Hyper) -> str | None:
    return None if hp.weights == "fp32" else hp.weights


def _calibrate_kw(hp: Hyper) -> dict[str, Any]:
    """AdamMini's calibration arguments of an adam-mini-snr variant (the window's plan: the built-in SNR
    table inside the budget, or AdamW's per-element state)."""
    budget = hp.calibrate_state == "budget"
    return {"calibrate": hp.calibrate_steps(), "snr_cutoff": hp.snr_cutoff, "calibrate_state": hp.calibrate_state,
            "rules": "builtin" if budget else None,
            "state_budget": (hp.state_budget or "auto") if budget else None}


def _adam_mini_snr(model, lr, hp, plan, info):
    from ..optim import AdamMini

    return AdamMini(model, lr=lr, betas=(hp.beta1, hp.beta2), eps=hp.eps, weight_decay=hp.weight_decay,
                    plan=_blr_plan(model, hp, plan), **_calibrate_kw(hp))


def _adam_mini_snr_blr(model, lr, hp, plan, info):
    from ..optim import AdamMini, blockwise_lr_groups

    plan = _blr_plan(model, hp, plan)  # roles (hence multipliers) are the structural plan's; SNR changes blocks
    groups = blockwise_lr_groups(model, lr, plan=plan, weight_decay=hp.weight_decay)
    return AdamMini(groups, lr=lr, betas=(hp.beta1, hp.beta2), eps=hp.eps, weight_decay=hp.weight_decay, plan=plan,
                    **_calibrate_kw(hp))


def _blr_plan(model, hp, plan):
    """The runner's plan when it matches this variant's value_single_block, else one built from the model."""
    from ..partition import partition

    if plan is None or bool(plan.options.get("value_single_block", False)) != hp.value_single_block:
        plan = partition(model, warn=False, value_single_block=hp.value_single_block)
    return plan


def _adamw_blr(model, lr, hp, plan, info):
    from ..optim import blockwise_lr_groups

    # lr is the base (Norm) rate; each group carries lr_multiplier, which the runner's schedule applies
    groups = blockwise_lr_groups(model, lr, plan=_blr_plan(model, hp, plan), weight_decay=hp.weight_decay,
                                 named=False)
    return _fastest_adamw(groups, lr=lr, betas=(hp.beta1, hp.beta2), eps=hp.eps, weight_decay=hp.weight_decay)


def _adam_mini_blr(model, lr, hp, plan, info):
    from ..optim import AdamMini, blockwise_lr_groups

    plan = _blr_plan(model, hp, plan)
    groups = blockwise_lr_groups(model, lr, plan=plan, weight_decay=hp.weight_decay)
    return AdamMini(groups, lr=lr, betas=(hp.beta1, hp.beta2), eps=hp.eps, weight_decay=hp.weight_decay, plan=plan)


def _adam_mini_default_blr(model, lr, hp, plan, info):
    from ..optim import AdamMini, blockwise_lr_groups

    # the multipliers follow the structural plan's roles; the blocks are the default's (AdamMini(model).plan:
    # the built-in SNR table, matrices factored, within the budget), built once from the model
    groups = blockwise_lr_groups(model, lr, plan=_blr_plan(model, hp, plan), weight_decay=hp.weight_decay)
    default = AdamMini(model, lr=lr, state_budget=hp.state_budget or "auto").plan
    return AdamMini(groups, lr=lr, betas=(hp.beta1, hp.beta2), eps=hp.eps, weight_decay=hp.weight_decay,
                    plan=default, momentum_dtype=None if hp.momentum_dtype == "fp32" else hp.momentum_dtype)


def _adam_mini_official(model, lr, hp, plan, info):
    from adam_mini import Adam_mini  # the official release (adam-mini on PyPI)

    if hp.value_single_block:
        raise BenchInputError(
            "--optimizers: adam-mini-official has no value_single_block option here; use it with adam-mini"
        )
    opt = Adam_mini(model.named_parameters(), lr=lr, betas=(hp.beta1, hp.beta2), eps=hp.eps,
                    weight_decay=hp.weight_decay, dim=info.d_model, n_heads=info.n_heads,
                    n_kv_heads=info.n_kv_heads, verbose=False)
    return opt


def _adafactor(model, lr, hp, plan, info):
    return torch.optim.Adafactor(_decay_groups(model, plan, hp), lr=lr, weight_decay=hp.weight_decay)


def _hidden_matrices(model: nn.Module) -> set[int]:
    """ids of 2-D parameters that are not the input embedding or the output head."""
    skip: set[int] = set()
    for get in ("get_input_embeddings", "get_output_embeddings"):
        fn = getattr(model, get, None)
        mod = fn() if callable(fn) else None
        if mod is not None:
            skip.update(id(p) for p in mod.parameters())
    for m in model.modules():  # any other embedding table (positions)
        if isinstance(m, (nn.Embedding, nn.EmbeddingBag)):
            skip.update(id(p) for p in m.parameters())
    return {id(p) for p in model.parameters() if p.dim() == 2 and id(p) not in skip and p.requires_grad}


def _muon(model, lr, hp, plan, info):
    hidden = _hidden_matrices(model)
    muon_params = [p for p in model.parameters() if id(p) in hidden]
    rest_groups = []
    for g in _decay_groups(model, plan, hp):
        ps = [p for p in g["params"] if id(p) not in hidden]
        if ps:
            rest_groups.append({**g, "params": ps})
    muon = torch.optim.Muon(muon_params, lr=lr, weight_decay=hp.weight_decay, adjust_lr_fn="match_rms_adamw")
    adamw = _fastest_adamw(rest_groups, lr=lr, betas=(hp.beta1, hp.beta2), eps=hp.eps)
    return ChainedOptimizer([muon, adamw])


def _po(cls_name: str, **fixed):
    def make(model, lr, hp, plan, info):
        import pytorch_optimizer

        cls = getattr(pytorch_optimizer, cls_name)
        kwargs = dict(fixed)
        if "betas" not in kwargs:
            kwargs["betas"] = (hp.beta1, hp.beta2)
        return cls(_decay_groups(model, plan, hp), lr=lr, weight_decay=hp.weight_decay, **kwargs)

    return make


def _cautious_adamw(model, lr, hp, plan, info):
    return CautiousAdamW(_decay_groups(model, plan, hp), lr=lr, betas=(hp.beta1, hp.beta2), eps=hp.eps,
                         weight_decay=hp.weight_decay)


_ADAM_OPTS = ("beta1", "beta2", "eps", "weight_decay")
REGISTRY: dict[str, OptimizerSpec] = {
    s.name: s
    for s in [
        OptimizerSpec("adamw", "AdamW", _adamw, 3e-3, "torch.optim.AdamW (fused=True where torch supports it)"),
        OptimizerSpec("adam-mini", "Adam-mini", _adam_mini, 3e-3,
                      "blockopt.AdamMini(rules='official'): the official release's blocks (momentum_dtype=bf16|int8 "
                      "stores m compactly; rules=builtin, state_budget=0.55 change the plan)",
                      options=_ADAM_OPTS + ("value_single_block", "momentum_dtype", "rules", "state_budget",
                                            "step_in_backward", "weights")),
        OptimizerSpec("adam-mini-default", "Adam-mini (default)", _adam_mini_default, 3e-3,
                      "blockopt.AdamMini(model), the default: the built-in SNR table with every matrix's v factored "
                      "(one value per row and per column), per-element v for the least constant tensors while "
                      "the state stays at or under 0.55x AdamW's (rules=blocks: blocks only)",
                      options=_ADAM_OPTS + ("momentum_dtype", "state_budget", "rules", "step_in_backward",
                                            "weights")),
        OptimizerSpec("adamw+blr", "AdamW+BLR", _adamw_blr, 1e-3,
                      "torch.optim.AdamW with Blockwise LR (peak lr x10 embedding, x8 QK, x6 FFN, x4 VO, x1 norm; "
                      "the swept lr is the norm one)"),
        OptimizerSpec("adam-mini+blr", "Adam-mini+BLR", _adam_mini_blr, 1e-3,
                      "blockopt.AdamMini with Blockwise LR (peak lr x10 embedding, x8 QK, x6 FFN, x4 VO, x1 norm; "
                      "the swept lr is the norm one)", options=_ADAM_OPTS + ("value_single_block",)),
        OptimizerSpec("adam-mini-default+blr", "Adam-mini (default)+BLR", _adam_mini_default_blr, 1e-3,
                      "adam-mini-default with Blockwise LR (multipliers as adam-mini+blr; the swept lr is the norm "
                      "one)", options=_ADAM_OPTS + ("momentum_dtype", "state_budget")),
        OptimizerSpec("adam-mini-snr", "Adam-mini (SNR)", _adam_mini_snr, 3e-3,
                      "blockopt.AdamMini(calibrate=N): the default plan within the 0.55x budget for the first 20 % of "
                      "the run while the SNR of v is measured on a sample, then blocks chosen from it (SlimAdam's "
                      "rule) within the budget; calibrate_state=adamw holds AdamW's v for the window instead",
                      options=_ADAM_OPTS + ("calibrate", "snr_cutoff", "calibrate_state", "state_budget")),
        OptimizerSpec("adam-mini-snr+blr", "Adam-mini (SNR)+BLR", _adam_mini_snr_blr, 1e-3,
                      "adam-mini-snr with Blockwise LR (multipliers as adam-mini+blr; the swept lr is the norm one)",
                      options=_ADAM_OPTS + ("calibrate", "snr_cutoff", "calibrate_state", "state_budget")),
        OptimizerSpec("adam-mini-official", "Adam-mini (official)", _adam_mini_official, 3e-3,
                      "the official release, adam_mini.Adam_mini 1.1.1", package="adam_mini", pip_name="adam-mini",
                      extra="official"),
        OptimizerSpec("adafactor", "Adafactor", _adafactor, 1e-2,
                      "torch.optim.Adafactor (relative step: lr caps min(lr, 1/sqrt(t)) x RMS(param))",
                      options=("weight_decay",)),
        OptimizerSpec("muon", "Muon", _muon, 3e-3,
                      "torch.optim.Muon on hidden 2-D matrices (lr matched to AdamW's RMS), AdamW on "
                      "embeddings, head and 1-D tensors"),
        OptimizerSpec("cautious-adamw", "C-AdamW", _cautious_adamw, 3e-3,
                      "Cautious AdamW (built in, plain loop)"),
        OptimizerSpec("lion", "Lion", _po("Lion"), 3e-4, "pytorch_optimizer.Lion", package="pytorch_optimizer",
                      pip_name="pytorch-optimizer", extra="optimizers", options=("beta1", "beta2", "weight_decay")),
        OptimizerSpec("soap", "SOAP", _po("SOAP"), 3e-3, "pytorch_optimizer.SOAP", package="pytorch_optimizer",
                      pip_name="pytorch-optimizer", extra="optimizers"),
        OptimizerSpec("adopt", "ADOPT", _po("ADOPT", weight_decouple=True), 3e-3, "pytorch_optimizer.ADOPT",
                      package="pytorch_optimizer", pip_name="pytorch-optimizer", extra="optimizers"),
        OptimizerSpec("laprop", "LaProp", _po("LaProp"), 3e-3, "pytorch_optimizer.LaProp",
                      package="pytorch_optimizer", pip_name="pytorch-optimizer", extra="optimizers"),
        OptimizerSpec("mars", "MARS", _po("MARS"), 3e-3, "pytorch_optimizer.MARS (AdamW flavour)",
                      package="pytorch_optimizer", pip_name="pytorch-optimizer", extra="optimizers"),
        OptimizerSpec("adan", "Adan", _po("Adan", weight_decouple=True, betas=(0.98, 0.92, 0.99)), 3e-3,
                      "pytorch_optimizer.Adan (betas 0.98, 0.92, 0.99)", package="pytorch_optimizer",
                      pip_name="pytorch-optimizer", extra="optimizers", options=("weight_decay",)),
    ]
}


def available() -> str:
    """``adamw, adam-mini, ... (lion, soap: pip install 'blockopt[optimizers]')``."""
    ok = [s.name for s in REGISTRY.values() if s.missing() is None]
    missing: dict[str, list[str]] = {}
    for s in REGISTRY.values():
        if s.missing() is not None:
            missing.setdefault(s.extra or "", []).append(s.name)
    text = ", ".join(ok)
    for extra, names in missing.items():
        text += f"; {', '.join(names)} need pip install 'blockopt[{extra}]'"
    return text


_MOMENTUM = ("fp32", "bf16", "int8")
_WEIGHTS = ("fp32", "bf16-sr", "bf16+int8", "bf16+int16")
_BOOL = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def parse_optimizer(text: str, *, check_installed: bool = True) -> OptimizerChoice:
    """``"adam-mini:value_single_block=true"`` -> :class:`OptimizerChoice` (raises BenchInputError)."""
    name, *opts = [t.strip() for t in text.strip().split(":")]
    spec = REGISTRY.get(name.lower())
    if spec is None:
        raise BenchInputError(f"--optimizers: unknown optimizer {name!r}; available: {available()}")
    options: dict[str, Any] = {}
    for o in opts:
        key, sep, value = o.partition("=")
        key = key.strip()
        if not sep or key not in spec.options:
            raise BenchInputError(
                f"--optimizers: bad option {o!r} for {spec.name}; expected key=value with key in "
                f"{', '.join(spec.options)}"
            )
        if key == "momentum_dtype":
            if value.lower() not in _MOMENTUM:
                raise BenchInputError(f"--optimizers: {spec.name}:{key}={value!r}; expected one of "
                                      f"{', '.join(_MOMENTUM)}")
            options[key] = value.lower()
        elif key == "weights":
            if value not in _WEIGHTS:
                raise BenchInputError(f"--optimizers: {spec.name}:weights={value!r}; expected one of "
                                      f"{', '.join(_WEIGHTS)} (fp32: the model's weights as they are)")
            options[key] = value
        elif key == "calibrate_state":
            if value not in ("budget", "adamw"):
                raise BenchInputError(f"--optimizers: {spec.name}:calibrate_state={value!r}; expected budget (the "
                                      "window inside the state budget) or adamw (AdamW's state for the window)")
            options[key] = value
        elif key == "rules":
            allowed = ("builtin", "blocks") if spec.name == "adam-mini-default" else ("official", "builtin", "blocks")
            if value not in allowed:
                raise BenchInputError(f"--optimizers: {spec.name}:rules={value!r}; expected {' or '.join(allowed)}"
                                      + (" (the official rules are the adam-mini row)" if "official" not in allowed
                                         else ""))
            options[key] = value
        elif key == "state_budget":
            try:
                v = float(value)
            except ValueError:
                v = math.nan
            if not 0.5 < v <= 1:
                raise BenchInputError(f"--optimizers: {spec.name}:state_budget={value!r}; expected a number in "
                                      "(0.5, 1], the largest optimizer state as a fraction of AdamW's")
            options[key] = v
        elif key in ("value_single_block", "step_in_backward"):
            if value.lower() not in _BOOL:
                raise BenchInputError(f"--optimizers: {spec.name}:{key}={value!r}; expected true or false")
            options[key] = _BOOL[value.lower()]
        else:
            try:
                v = float(value)
            except ValueError:
                v = math.nan
            lim = (0.0, 1.0) if key in ("beta1", "beta2") else (0.0, math.inf)
            if key in ("calibrate", "snr_cutoff") and not (v > 0 and math.isfinite(v)):
                raise BenchInputError(
                    f"--optimizers: {spec.name}:{key}={value!r}; expected a positive number"
                    + (" (a fraction of the run below 1, or steps)" if key == "calibrate" else ""))
            if key == "calibrate" and v >= 1 and v != int(v):
                raise BenchInputError(f"--optimizers: {spec.name}:calibrate={value!r}; expected a fraction in (0, 1) "
                                      "or a whole number of steps")
            if not (lim[0] <= v < lim[1]):
                raise BenchInputError(
                    f"--optimizers: {spec.name}:{key}={value!r}; expected a number in [{lim[0]:g}, {lim[1]:g})"
                )
            options[key] = v
    if check_installed and (why := spec.missing()):
        raise BenchInputError(f"--optimizers: {why}")
    return OptimizerChoice(spec, options)


def build_optimizer(choice: OptimizerChoice, model: nn.Module, lr: float, base: Hyper, *, plan,
                    info: ModelInfo) -> torch.optim.Optimizer:
    """Instantiate ``choice`` for ``model`` at learning rate ``lr``."""
    return choice.spec.factory(model, lr, choice.hyper(base), plan, info)
