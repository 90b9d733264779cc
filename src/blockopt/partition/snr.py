"""Blocks from data: the signal-to-noise ratio of Adam's second moment along candidate partitions.

Replacing Adam's per-element second moment ``v`` by its mean over a block is
harmless where ``v`` is nearly constant inside the blocks. SlimAdam (Kalra et
al., 2025) measures that with

    SNR_K(v) = mean over blocks of  mean_block(v)**2 / var_block(v)

(population variance; blocks whose ratio is not finite are left out), on
AdamW's ``v`` at several points of a run, averaged over the points. For each
tensor the candidate with the highest SNR above a cutoff (1.0) wins; when no
candidate passes, the tensor keeps one value per element (plain Adam).

This module has the pieces, each usable alone:

* :func:`candidates` -- the partitions the geometry layer can express for a
  plan entry: ``row`` (one v per output neuron), ``column`` (one per input),
  ``head`` / ``structural`` (the structural plan's head or fused split),
  ``lead`` (3-D+ tensors: one per index of all dims but the last, e.g. per
  expert and output row of stacked experts) and ``tensor``.
* :func:`block_snr` -- the exact SNR of a stored ``v`` for one geometry.
* :class:`SNRMeter` -- collects SNRs at measurement points (exact, from full
  ``v`` tensors) into an :class:`SNRCalibration`;
  :class:`SampledSNRMeter` does the same in bounded memory, keeping its own
  running ``v`` on a fixed random sample of blocks and elements.
* :class:`SNRCalibration` -- the measurement as data (JSON round trip, tied to
  the model's parameter names and shapes).
* :func:`snr_entry` / :func:`apply_snr` -- the decision for one entry / a plan.
* :class:`SNRRules` -- decisions by role (``query``, ``key``, ``value``,
  ``attn_out``, ``mlp_up``, ``mlp_down``, ``embedding``, ``norm``...), so a
  calibration of a small proxy applies to a larger model of the family;
  :data:`BUILTIN_SNR_RULES` is a table that needs no calibration.

:func:`blockopt.partition` takes ``snr=`` (a calibration, rules, or
``"builtin"``) and ``snr_cutoff=``; :class:`blockopt.AdamMini` takes
``calibrate=N`` to measure inside the run and switch after ``N`` steps.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from ..kernels.blocks import Geometry, block_coordinates, block_views
from .plan import PartitionPlan, PlanEntry

__all__ = [
    "BUILTIN_SNR_RULES",
    "CANDIDATE_KINDS",
    "SNRCalibration",
    "SNRMeter",
    "SNRRules",
    "SampledSNRMeter",
    "apply_snr",
    "block_snr",
    "candidates",
    "check_cutoff",
    "load_snr",
    "measure_steps",
    "rule_key",
    "snr_entry",
]

#: candidate labels, in the order they are listed; ``element`` is the fallback, never scored
CANDIDATE_KINDS = ("row", "column", "head", "structural", "lead", "tensor")
RULE_KINDS = CANDIDATE_KINDS + ("element", "keep")
_FORMAT = 1


def check_cutoff(cutoff: Any) -> float:
    """``cutoff`` as a float; ``ValueError`` unless it is a positive finite number."""
    if isinstance(cutoff, bool) or not isinstance(cutoff, (int, float)) or not math.isfinite(cutoff) or cutoff <= 0:
        raise ValueError(f"Invalid snr_cutoff: {cutoff!r}; expected a positive finite number (default 1.0)")
    return float(cutoff)


# --- candidates -------------------------------------------------------------------------------
def _out_axis(entry: PlanEntry) -> int:
    """The dim that indexes output neurons: the structural geometry's axis when it names one."""
    axis = entry.geometry.axis
    return axis if axis in (0, 1) else 0


def candidates(entry: PlanEntry) -> dict[str, Geometry]:
    """The partitions that can replace per-element ``v`` for ``entry``, label -> geometry.

    Scalars and one-element tensors have none. A vector has ``tensor``. A
    matrix (or a tensor of more dims) has ``row`` (one v per index of the
    output dim: dim 1 for weights stored ``[in, out]``), ``column`` (the other
    of the first two dims), ``tensor``; ``head`` when the structural plan cut
    it into heads, ``structural`` when it is a fused weight (parts with their
    own rules), and ``lead`` for 3-D+ tensors (one v per index of every dim
    but the last: per expert and row of a stacked ``[E, out, in]`` expert).
    """
    shape = entry.shape
    numel = math.prod(shape)
    if numel <= 1:
        return {}
    whole = Geometry(-1, ((numel, numel),))
    if len(shape) == 1:
        return {"tensor": whole}
    a = _out_axis(entry)
    out = {"row": Geometry(a, ((shape[a], 1),)), "column": Geometry(1 - a, ((shape[1 - a], 1),))}
    if entry.kind == "head":
        out["head"] = entry.geometry
    elif entry.kind == "fused":
        out["structural"] = entry.geometry
    if len(shape) >= 3:
        out["lead"] = Geometry(-1, ((numel, shape[-1]),))
    out["tensor"] = whole
    return out


def _element(entry: PlanEntry) -> Geometry:
    return Geometry(-1, ((entry.numel, 1),))


# --- the measure ------------------------------------------------------------------------------
def _ratio_mean(mean: torch.Tensor, var: torch.Tensor) -> float:
    ratio = mean * mean / var
    ratio = ratio[torch.isfinite(ratio)]
    return float(ratio.mean()) if ratio.numel() else math.nan


def block_snr(v: torch.Tensor, geometry: Geometry) -> float:
    """SNR of ``v`` (a full per-element second moment, the parameter's shape) for ``geometry``.

    Mean over blocks of ``mean(v)**2 / var(v)`` with the population variance,
    computed in float64 with two passes; blocks whose ratio is not finite
    (constant or all-zero blocks) are left out; ``nan`` when none is left.
    """
    v = v.detach().to(torch.float64)
    if not v.is_contiguous():
        v = v.contiguous()
    means, vars_ = [], []
    for view in block_views(v, geometry):
        view = view.reshape(view.shape[0], -1)
        means.append(view.mean(dim=1))
        vars_.append(view.var(dim=1, correction=0))
    return _ratio_mean(torch.cat(means), torch.cat(vars_))


def snr_of_candidates(entry: PlanEntry, v: torch.Tensor) -> dict[str, float]:
    """:func:`block_snr` of ``v`` for every candidate of ``entry``."""
    v = v.detach().reshape(entry.shape)
    return {label: block_snr(v, geo) for label, geo in candidates(entry).items()}


# --- the record -------------------------------------------------------------------------------
@dataclass
class SNRCalibration:
    """SNR measurements of one model: per tensor and candidate, the values at each point.

    ``shapes`` names every parameter of the model the measurement belongs to
    (a calibration for another model is refused by :meth:`check_plan`);
    ``values[name][label]`` lists one SNR per measurement point (``steps``).
    """

    shapes: dict[str, tuple[int, ...]]
    steps: list[int] = field(default_factory=list)
    values: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)  # how it was measured: exact/sampled, lr, ...

    def add(self, step: int, measured: Mapping[str, Mapping[str, float]]) -> None:
        """Record one measurement point: ``{name: {label: snr}}``."""
        self.steps.append(int(step))
        for name, by_label in measured.items():
            slot = self.values.setdefault(name, {})
            for label, value in by_label.items():
                slot.setdefault(label, []).append(float(value))

    def mean(self, name: str) -> dict[str, float]:
        """Per candidate, the mean of the finite values over the points (``nan`` when none)."""
        out = {}
        for label, vals in self.values.get(name, {}).items():
            finite = [x for x in vals if math.isfinite(x)]
            out[label] = sum(finite) / len(finite) if finite else math.nan
        return out

    def check_plan(self, plan: PartitionPlan) -> None:
        """``ValueError`` unless this calibration was measured on ``plan``'s model (names and shapes)."""
        here = {e.name: e.shape for e in plan.entries}
        missing = sorted(set(here) - set(self.shapes))
        extra = sorted(set(self.shapes) - set(here))
        wrong = sorted(n for n in set(here) & set(self.shapes) if tuple(self.shapes[n]) != here[n])
        if missing or extra or wrong:
            parts = []
            if missing:
                parts.append(f"{len(missing)} parameter(s) of this model are not in it, e.g. {missing[:3]}")
            if extra:
                parts.append(f"it has {len(extra)} parameter(s) this model lacks, e.g. {extra[:3]}")
            if wrong:
                n = wrong[0]
                parts.append(f"{len(wrong)} shape(s) differ, e.g. {n!r}: {list(self.shapes[n])} there, "
                             f"{list(here[n])} here")
            raise ValueError(
                "Invalid snr: the calibration was measured on another model (" + "; ".join(parts) + "); "
                "calibrate this model, or write the decisions as rules by role (SNRRules.from_calibration) "
                "to carry them to another model of the family"
            )

    def to_dict(self) -> dict[str, Any]:
        return {"format": _FORMAT, "kind": "blockopt.snr_calibration", "source": self.source,
                "steps": self.steps, "shapes": {n: list(s) for n, s in self.shapes.items()},
                "values": self.values}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SNRCalibration:
        if not isinstance(d, Mapping) or d.get("kind") != "blockopt.snr_calibration":
            raise ValueError("not a blockopt SNR calibration: expected a mapping with kind "
                             "'blockopt.snr_calibration' (written by SNRCalibration.save or blockopt calibrate)")
        if d.get("format") != _FORMAT:
            raise ValueError(f"SNR calibration format {d.get('format')!r} is not supported; expected {_FORMAT}")
        return cls({n: tuple(s) for n, s in d["shapes"].items()}, list(d["steps"]),
                   {n: {k: [float(x) for x in v] for k, v in by.items()} for n, by in d["values"].items()},
                   dict(d.get("source", {})))

    def to_json(self, indent: int | None = 1) -> str:
        # json writes nan as NaN, which json reads back
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_json(cls, text: str) -> SNRCalibration:
        return cls.from_dict(json.loads(text))

    def save(self, path: str | os.PathLike) -> None:
        from ..utils import atomic_write_text

        atomic_write_text(path, self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike) -> SNRCalibration:
        with open(path, encoding="utf-8") as f:
            return cls.from_json(f.read())

    def table(self, plan: PartitionPlan | None = None, cutoff: float = 1.0) -> str:
        """Mean SNR per tensor and candidate, and the decision at ``cutoff``."""
        labels = [k for k in CANDIDATE_KINDS if any(k in by for by in self.values.values())]
        rows = []
        for name in self.values:
            snr = self.mean(name)
            choice, _ = _choose(snr, cutoff)
            rows.append((name, *(f"{snr[k]:.2f}" if k in snr and math.isfinite(snr[k]) else "-" for k in labels),
                         choice))
        header = ("parameter", *labels, f"choice (cutoff {cutoff:g})")
        widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
        fmt = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()
        return "\n".join([fmt(header), fmt(tuple("-" * w for w in widths)), *map(fmt, rows)])


# --- meters ---------------------------------------------------------------------------------
class SNRMeter:
    """Exact SNRs from full second moments; one :meth:`measure` per point.

    ``plan`` (structural) gives each tensor's candidates. Feed it the per-element
    ``v`` of every tensor -- ``{name: v}``, or :meth:`measure_optimizer` on a
    ``torch.optim.Adam``/``AdamW`` whose state holds ``exp_avg_sq``.
    """

    def __init__(self, plan: PartitionPlan, source: Mapping[str, Any] | None = None) -> None:
        self.plan = plan
        self.calibration = SNRCalibration({e.name: e.shape for e in plan.entries},
                                          source={"method": "exact", **(source or {})})

    def measure(self, step: int, vs: Mapping[str, torch.Tensor]) -> None:
        measured = {}
        for name, v in vs.items():
            entry = self.plan[name]
            if v.numel() != entry.numel:
                raise ValueError(f"Invalid v for {name!r}: {v.numel()} values, the parameter has {entry.numel}")
            measured[entry.name] = snr_of_candidates(entry, v)
        self.calibration.add(step, measured)

    def measure_optimizer(self, step: int, optimizer: torch.optim.Optimizer,
                          named_params: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Read ``exp_avg_sq`` of every named parameter that has state in ``optimizer``."""
        vs = {}
        for name, p in named_params:
            s = optimizer.state.get(p, {})
            if "exp_avg_sq" in s and name in self.plan:
                vs[name] = s["exp_avg_sq"]
        if not vs:
            raise ValueError("Invalid optimizer: no parameter has 'exp_avg_sq' state (is it torch.optim.AdamW, "
                             "and has it stepped?)")
        self.measure(step, vs)


def block_ratio_mean(v: torch.Tensor, ids: torch.Tensor) -> float:
    """The SNR of values ``v`` grouped by block ids ``ids`` (any ints): the mean over groups of
    ``mean**2 / var`` (population variance, float64); groups of one value, or constant, are left out."""
    v = v.to("cpu", torch.float64)
    _, inv = torch.unique(ids.cpu(), return_inverse=True)
    nb = int(inv.max()) + 1 if inv.numel() else 0
    cnt = torch.zeros(nb, dtype=torch.float64).index_add_(0, inv, torch.ones_like(v))
    mean = torch.zeros(nb, dtype=torch.float64).index_add_(0, inv, v) / cnt
    dev = v - mean[inv]
    var = torch.zeros(nb, dtype=torch.float64).index_add_(0, inv, dev * dev) / cnt
    return _ratio_mean(mean, var)


def draw_block_sample(shape: tuple[int, ...], geometry: Geometry, n_blocks: int, per_block: int,
                      gen: torch.Generator) -> list[torch.Tensor]:
    """Flat indices of a random sample of a tensor's blocks: ``n_blocks`` blocks (all of them when there
    are no more), and of each at most ``per_block`` elements, drawn with ``gen``; one tensor per block,
    in block order."""
    nb = geometry.num_blocks
    blocks = torch.arange(nb) if nb <= n_blocks else torch.randperm(nb, generator=gen)[:n_blocks].sort().values
    out = []
    for b in blocks.tolist():
        el = block_elements(shape, geometry, b)
        if el.numel() > per_block:
            el = el[torch.randperm(el.numel(), generator=gen)[:per_block].sort().values]
        out.append(el)
    return out


def block_elements(shape: tuple[int, ...], geometry: Geometry, block: int) -> torch.Tensor:
    """Flat indices (int64) of the elements of block ``block`` of a contiguous tensor of ``shape``."""
    axis, segments = geometry
    if axis == -1:
        ((_, unit),) = segments
        return torch.arange(block * unit, (block + 1) * unit)
    along = block_coordinates(geometry, block)
    inner = math.prod(shape[axis + 1:])
    outer = math.prod(shape[:axis])
    stride = shape[axis] * inner
    idx = (torch.arange(outer)[:, None, None] * stride + along[None, :, None] * inner
           + torch.arange(inner)[None, None, :])
    return idx.reshape(-1)


class SampledSNRMeter:
    """SNRs in bounded memory: a running ``v`` on a fixed random sample of each candidate's blocks.

    For every tensor and candidate, up to ``max_blocks`` blocks are drawn (all of
    them when there are fewer), and inside each block up to ``max_elements``
    elements (a candidate with fewer blocks may use its whole budget of ``max_blocks x max_elements``
    elements); the meter keeps ``v`` only there, updating it from the gradients
    with :meth:`update` (``v <- beta2 v + (1 - beta2) g**2``, as AdamW does), so
    a model whose full AdamW ``v`` does not fit can still be calibrated while it
    trains with any optimizer. Memory: at most ``candidates x max_blocks x
    max_elements`` values per tensor. The estimate's error against the exact SNR
    is measured by ``tests/partition/test_snr.py`` and stated in ``docs/snr.md``.
    """

    def __init__(self, plan: PartitionPlan, *, beta2: float = 0.95, max_blocks: int = 64,
                 max_elements: int = 256, seed: int = 0, source: Mapping[str, Any] | None = None) -> None:
        for name, value in (("max_blocks", max_blocks), ("max_elements", max_elements)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 2:
                raise ValueError(f"Invalid {name}: {value!r}; expected an int >= 2")
        if not 0.0 <= beta2 < 1.0:
            raise ValueError(f"Invalid beta2: {beta2!r}; expected a float in [0, 1)")
        self.plan, self.beta2 = plan, float(beta2)
        self.calibration = SNRCalibration(
            {e.name: e.shape for e in plan.entries},
            source={"method": "sampled", "max_blocks": max_blocks, "max_elements": max_elements, "seed": seed,
                    **(source or {})})
        gen = torch.Generator().manual_seed(seed)
        # per tensor: the union of sampled flat indices, and per candidate (positions into it, block ids)
        self._index: dict[str, torch.Tensor] = {}
        self._parts: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor, int]]] = {}
        self._v: dict[str, torch.Tensor] = {}
        for e in plan.entries:
            cands = candidates(e)
            if not cands:
                continue
            chosen: list[tuple[str, torch.Tensor, torch.Tensor, int]] = []
            for label, geo in cands.items():
                # a candidate's budget is max_blocks x max_elements values: few large blocks (a whole
                # tensor) get more elements each
                n_blocks = min(geo.num_blocks, max_blocks)
                idx = draw_block_sample(e.shape, geo, n_blocks, max(max_elements, (max_blocks * max_elements)
                                                                    // n_blocks), gen)
                ids = [torch.full((el.numel(),), j, dtype=torch.int64) for j, el in enumerate(idx)]
                chosen.append((label, torch.cat(idx), torch.cat(ids), len(idx)))
            union, inverse = torch.unique(torch.cat([c[1] for c in chosen]), return_inverse=True)
            self._index[e.name] = union
            parts, off = {}, 0
            for label, idx, ids, nb in chosen:
                parts[label] = (inverse[off:off + idx.numel()], ids, nb)
                off += idx.numel()
            self._parts[e.name] = parts
            self._v[e.name] = torch.zeros(union.numel(), dtype=torch.float64)

    @property
    def num_values(self) -> int:
        """How many ``v`` values the meter keeps (its memory, in float64 values)."""
        return sum(v.numel() for v in self._v.values())

    @torch.no_grad()
    def update(self, named_params: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Fold the current gradients into the sampled ``v`` (call once per optimizer step)."""
        for name, p in named_params:
            if name not in self._index or p.grad is None:
                continue
            g = p.grad.detach().reshape(-1)
            idx = self._index[name]
            sample = g[idx.to(g.device)].to("cpu", torch.float64)
            self._v[name].mul_(self.beta2).addcmul_(sample, sample, value=1 - self.beta2)

    def estimates(self) -> dict[str, dict[str, float]]:
        out = {}
        for name, parts in self._parts.items():
            v = self._v[name]
            by = {}
            for label, (pos, ids, nb) in parts.items():
                x = v[pos]
                cnt = torch.zeros(nb, dtype=torch.float64).index_add_(0, ids, torch.ones_like(x))
                mean = torch.zeros(nb, dtype=torch.float64).index_add_(0, ids, x) / cnt
                dev = x - mean[ids]
                var = torch.zeros(nb, dtype=torch.float64).index_add_(0, ids, dev * dev) / cnt
                by[label] = _ratio_mean(mean, var)
            out[name] = by
        return out

    def measure(self, step: int) -> None:
        self.calibration.add(step, self.estimates())


def measure_steps(window: int, points: int) -> list[int]:
    """The steps (1-based) at which a calibration of ``window`` steps measures ``v``: ``points`` evenly
    spaced over the second half of the window (the first steps' ``v`` is mostly the first gradients),
    the last at the window's end."""
    half = window / 2
    return sorted({max(1, round(half + half * (i + 1) / points)) for i in range(points)})


# --- decisions --------------------------------------------------------------------------------
def _choose(snr: Mapping[str, float], cutoff: float) -> tuple[str, float]:
    """(label, snr) of the best candidate above ``cutoff``; ``("element", best)`` when none passes."""
    best_label, best = "element", -math.inf
    for label in CANDIDATE_KINDS:
        x = snr.get(label, math.nan)
        if math.isfinite(x) and x > best:
            best_label, best = label, x
    if best > cutoff:
        return best_label, best
    return "element", best


def _fmt_snr(snr: Mapping[str, float]) -> str:
    return ", ".join(f"{k} {v:.2f}" for k, v in snr.items() if math.isfinite(v)) or "no finite SNR"


def snr_entry(entry: PlanEntry, snr: Mapping[str, float], cutoff: float = 1.0) -> PlanEntry:
    """``entry`` re-cut by SNR: the best candidate above ``cutoff``, else one v per element."""
    cands = candidates(entry)
    if not cands:
        return entry
    label, value = _choose({k: v for k, v in snr.items() if k in cands}, cutoff)
    geo = cands[label] if label != "element" else _element(entry)
    why = (f"SNR: {label} {value:.2f} > {cutoff:g}" if label != "element"
           else f"SNR: none > {cutoff:g}, per element")
    rounded = tuple((k, round(float(v), 4)) for k, v in snr.items() if k in cands and math.isfinite(v))
    return replace(entry, geometry=geo, parts=entry.parts if label == "structural" else (),
                   rule=f"{why} ({_fmt_snr(dict(rounded))})", snr=rounded, snr_choice=label)


def apply_snr(plan: PartitionPlan, snr: Any, cutoff: float = 1.0, *, keep: Iterable[str] = ()) -> PartitionPlan:
    """``plan`` with every entry re-cut by ``snr`` (a :class:`SNRCalibration`, :class:`SNRRules` or
    ``"builtin"``), except the names in ``keep`` (entries the user decided with an override)."""
    cutoff = check_cutoff(cutoff)
    keep = set(keep)
    if isinstance(snr, (str, os.PathLike)):
        snr = BUILTIN_SNR_RULES if snr == "builtin" else load_snr(snr)
    if isinstance(snr, SNRRules):
        return snr.apply(plan, keep=keep, strict=snr is not BUILTIN_SNR_RULES)
    if not isinstance(snr, SNRCalibration):
        raise ValueError(  # noqa: TRY004 - bad input is a ValueError naming the argument (house rule)
            f"Invalid snr: expected an SNRCalibration, SNRRules, 'builtin' or the path of a calibration or rules file, "
            f"got {type(snr).__name__}")
    snr.check_plan(plan)
    # tensors without a measurement (no gradient during calibration) keep their structural entry
    new = {e.name: snr_entry(e, snr.mean(e.name), cutoff) for e in plan.entries
           if e.name not in keep and snr.values.get(e.name)}
    options = {**plan.options, "snr": {"method": snr.source.get("method", "exact"), "cutoff": cutoff,
                                       "points": len(snr.steps)}}
    return replace(plan.replace_entries(new), options=options)


# --- rules by role ----------------------------------------------------------------------------
def rule_key(entry: PlanEntry) -> str:
    """The role a rule names: the plan's role, with MLP matrices split by shape into ``mlp_up`` (as many
    or more outputs than inputs) and ``mlp_down`` (fewer outputs than inputs)."""
    if entry.role == "mlp" and len(entry.shape) == 2:
        a = _out_axis(entry)
        return "mlp_up" if entry.shape[a] >= entry.shape[1 - a] else "mlp_down"
    return entry.role


def _leaf(name: str) -> str:
    parts = name.split(".")
    return parts[-2] if len(parts) >= 2 else parts[-1]


@dataclass(frozen=True)
class SNRRules:
    """SNR decisions written by role: ``{key: kind}``.

    A key is a role (see :func:`rule_key`) or ``role/leaf`` where ``leaf`` is the
    module's attribute name (``mlp_down/down_proj``); the more specific key wins.
    A kind is a candidate label (``row``, ``column``, ``head``, ``structural``,
    ``lead``, ``tensor``), ``element``, or ``keep`` (the structural rule).
    Tensors no key names keep the structural rule.
    """

    rules: Mapping[str, str]
    source: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.rules, Mapping) or not self.rules:
            raise ValueError(f"Invalid rules: {self.rules!r}; expected a non-empty mapping role -> kind")
        for key, kind in self.rules.items():
            if not isinstance(key, str) or not key:
                raise ValueError(f"Invalid rules key: {key!r}; expected a role name such as 'query' or "
                                 "'mlp_down/down_proj'")
            if kind not in RULE_KINDS:
                raise ValueError(f"Invalid rules[{key!r}]: {kind!r}; allowed: {', '.join(RULE_KINDS)}")
        object.__setattr__(self, "rules", dict(self.rules))

    def kind_for(self, entry: PlanEntry) -> tuple[str | None, str | None]:
        """(key, kind) of the rule that applies to ``entry``, or (None, None)."""
        role = rule_key(entry)
        for key in (f"{role}/{_leaf(entry.name)}", role):
            if key in self.rules:
                return key, self.rules[key]
        return None, None

    def apply(self, plan: PartitionPlan, *, keep: Iterable[str] = (), strict: bool = True) -> PartitionPlan:
        """``plan`` re-cut by the rules. With ``strict``, a key that names no tensor is an error."""
        keep = set(keep)
        used: set[str] = set()
        new = {}
        for e in plan.entries:
            key, kind = self.kind_for(e)
            if key is None:
                continue
            used.add(key)
            if e.name in keep or kind == "keep":
                continue
            cands = candidates(e)
            if kind == "element":
                geo = _element(e) if cands else e.geometry
            elif kind in cands:
                geo = cands[kind]
            else:  # a kind this tensor cannot take (a vector's "row", a "head" without heads): keep it
                continue
            new[e.name] = replace(e, geometry=geo, parts=e.parts if kind == "structural" else (),
                                  rule=f"SNR rule {key!r} -> {kind}" + (f" ({self.source})" if self.source else ""),
                                  snr_choice=kind)
        unused = sorted(set(self.rules) - used)
        if strict and unused:
            roles = sorted({rule_key(e) for e in plan.entries})
            raise ValueError(f"Invalid rules: {unused} name no tensor of this model; its roles are {roles} "
                             "(keys are a role or role/leaf, e.g. 'mlp_down/down_proj')")
        options = {**plan.options, "snr": {"method": "rules", "rules": dict(self.rules)}}
        return replace(plan.replace_entries(new), options=options)

    @classmethod
    def from_calibration(cls, plan: PartitionPlan, calibration: SNRCalibration, cutoff: float = 1.0, *,
                         by_leaf: bool = True) -> SNRRules:
        """Rules from a calibration: per key (``role/leaf`` when ``by_leaf``, else role), the candidate
        whose SNR averaged over the key's tensors is highest above ``cutoff``, else ``element``."""
        cutoff = check_cutoff(cutoff)
        calibration.check_plan(plan)
        sums: dict[str, dict[str, list[float]]] = {}
        for e in plan.entries:
            if not candidates(e):
                continue
            key = f"{rule_key(e)}/{_leaf(e.name)}" if by_leaf and e.role not in ("norm", "bias") else rule_key(e)
            slot = sums.setdefault(key, {})
            for label, value in calibration.mean(e.name).items():
                if math.isfinite(value):
                    slot.setdefault(label, []).append(value)
        rules = {}
        for key, by in sums.items():
            # only candidates every tensor of the key has
            n = max(len(v) for v in by.values()) if by else 0
            mean = {k: sum(v) / len(v) for k, v in by.items() if len(v) == n}
            rules[key] = _choose(mean, cutoff)[0]
        return cls(rules, source=f"calibration at cutoff {cutoff:g}")

    def to_dict(self) -> dict[str, Any]:
        return {"format": _FORMAT, "kind": "blockopt.snr_rules", "source": self.source, "rules": dict(self.rules)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SNRRules:
        """Rules from what :meth:`to_dict` wrote, or from a hand-written ``{"rules": {key: kind}}`` or
        ``{key: kind}`` mapping."""
        if isinstance(d, Mapping) and "kind" not in d and d:
            if isinstance(d.get("rules"), Mapping):
                return cls(dict(d["rules"]), str(d.get("source", "")))
            if all(isinstance(v, str) for v in d.values()):
                return cls(dict(d))
        if not isinstance(d, Mapping) or d.get("kind") != "blockopt.snr_rules" or "rules" not in d:
            raise ValueError("not blockopt SNR rules: expected a mapping with kind 'blockopt.snr_rules' and 'rules', "
                             "or a {role: kind} mapping")
        return cls(dict(d["rules"]), str(d.get("source", "")))

    def save(self, path: str | os.PathLike) -> None:
        from ..utils import atomic_write_text

        atomic_write_text(path, json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | os.PathLike) -> SNRRules:
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))


#: A rule table that needs no calibration (``partition(model, snr="builtin")``); see docs/snr.md for
#: the measurements behind it.
BUILTIN_SNR_RULES = SNRRules(
    {
        "embedding": "row",
        "output": "row",
        "query": "row",
        "key": "row",
        "value": "row",
        "attn_out": "column",
        "mlp_up": "row",
        "mlp_down": "column",
        "norm": "element",
    },
    source="built-in table",
)


_SNR_FILE_EXPECTED = ("expected 'builtin' or a JSON file written by SNRCalibration.save or 'blockopt calibrate --out' "
                      "(an SNR calibration), or by SNRRules.save or 'blockopt calibrate --rules-out' (SNR rules; a "
                      "{role: kind} mapping also reads as rules)")


def load_snr(path: str | os.PathLike, argument: str = "snr") -> SNRCalibration | SNRRules:
    """Read an SNR calibration or SNR rules file, telling which from its content (its ``kind``).

    ``partition(model, snr="calib.json")`` and ``blockopt plan --snr`` read their file here.
    Every problem raises a ``ValueError`` that names ``argument``, the path and what the file must be.
    """
    where = os.fspath(path)
    try:
        with open(where, encoding="utf-8") as f:
            d = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"Invalid {argument}: {where!r}: no such file; {_SNR_FILE_EXPECTED}") from None
    except (OSError, ValueError) as e:
        raise ValueError(f"Invalid {argument}: cannot read {where!r} as JSON ({e}); {_SNR_FILE_EXPECTED}") from None
    kind = d.get("kind") if isinstance(d, Mapping) else None
    try:
        if kind == "blockopt.snr_calibration":
            return SNRCalibration.from_dict(d)
        if kind == "blockopt.snr_rules" or (isinstance(d, Mapping) and "kind" not in d and "entries" not in d):
            return SNRRules.from_dict(d)
    except KeyError as e:
        raise ValueError(f"Invalid {argument}: {where!r}: its {kind!r} data lacks the key {e}") from None
    except (ValueError, TypeError) as e:
        raise ValueError(f"Invalid {argument}: {where!r}: {e}") from None
    what = ("a partition plan (PartitionPlan.load reads it)"
            if isinstance(d, Mapping) and "entries" in d else
            f"of kind {kind!r}" if kind is not None else f"a JSON {type(d).__name__}")
    raise ValueError(f"Invalid {argument}: {where!r} is {what}, not an SNR calibration or SNR rules; {_SNR_FILE_EXPECTED}")
