"""PartitionPlan: the partition engine's decision for every parameter, as data."""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from ..kernels.blocks import FACTORED, Geometry, check_geometry
from ..utils import fmt_bytes as _fmt_bytes

__all__ = ["KINDS", "PartitionPlan", "PlanEntry", "canonical_name"]

#: module wrappers that insert a name segment without changing the model: ``torch.compile``
#: (``_orig_mod``), activation checkpointing and FSDP1
_WRAPPER_SEGMENT = re.compile(r"(?:^|(?<=\.))(?:_orig_mod|_checkpoint_wrapped_module|_fsdp_wrapped_module)\.")


def canonical_name(name: str) -> str:
    """A parameter name without the segments wrappers insert (``_orig_mod.`` of ``torch.compile``...),
    so that plans and states of a compiled or wrapped model match the plain one."""
    return _WRAPPER_SEGMENT.sub("", name) if "_" in name else name

#: the kinds an entry can have; "fused" is a weight holding several parts; "group" is runs of
#: consecutive elements; "stacked_row" / "stacked_column" are one block per slice of dim 0 and
#: output neuron of stacked matrices (mixture-of-experts weights ``[E, out, in]`` / ``[E, in, out]``);
#: "factored" is not blocks: a matrix's row and column second moments, whose product stands for each
#: element's (see :mod:`blockopt.kernels.blocks`)
KINDS = ("element", "tensor", "row", "column", "head", "fused", "group", "stacked_row", "stacked_column",
         "factored")

_PLAN_FORMAT = 1


@dataclass(frozen=True)
class PlanEntry:
    """How one parameter is cut into second-moment blocks.

    Attributes:
        name: the parameter's name in ``model.named_parameters()``.
        shape: its (global, unsharded) shape.
        geometry: ``(axis, segments)``, see :mod:`blockopt.kernels.blocks`.
        role: what the tensor does: ``embedding``, ``position_embedding``,
            ``output``, ``query``, ``key``, ``value``, ``qkv``,
            ``attn_out``, ``mlp`` (stacked experts too), ``router``, ``norm``,
            ``bias``, ``conv``, ``other``.
        rule: the rule that decided the entry, in words.
        weight_decay: whether the group's weight decay applies to it.
        parts: for fused weights, the role of each segment (e.g.
            ``("query", "key", "value")``).
        aliases: other names of the same tensor (tied weights).
        snr: for entries decided from data, the measured SNR of each candidate
            partition (``(("row", 4.7), ("column", 0.4), ...)``); empty otherwise.
        snr_choice: the candidate an SNR plan chose (``"row"``, ``"column"``,
            ``"element"``...); empty for structural entries.
        trainable: ``False`` for a frozen parameter (``requires_grad=False`` when
            the plan was built, such as the base weights under LoRA): it keeps no
            optimizer state and the plan's totals leave it out.
    """

    name: str
    shape: tuple[int, ...]
    geometry: Geometry
    role: str
    rule: str
    weight_decay: bool
    parts: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()
    snr: tuple[tuple[str, float], ...] = ()
    snr_choice: str = ""
    trainable: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        axis, segments = self.geometry
        geometry = Geometry(int(axis), tuple((int(a), int(b)) for a, b in segments))
        object.__setattr__(self, "geometry", geometry)
        object.__setattr__(self, "parts", tuple(self.parts))
        object.__setattr__(self, "aliases", tuple(self.aliases))
        snr = self.snr.items() if isinstance(self.snr, Mapping) else self.snr
        object.__setattr__(self, "snr", tuple((str(k), float(v)) for k, v in snr))
        check_geometry(self.shape, geometry)
        if self.parts and len(self.parts) != len(geometry.segments):
            raise ValueError(
                f"entry {self.name!r}: {len(self.parts)} part names for "
                f"{len(geometry.segments)} segments"
            )

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def num_blocks(self) -> int:
        """How many second-moment scalars this parameter keeps."""
        return self.geometry.num_blocks

    @property
    def kind(self) -> str:
        axis, segments = self.geometry
        if axis == FACTORED:
            return "factored"
        if axis == -1:
            ((size, unit),) = segments
            if unit == size:
                return "tensor"
            if unit == 1:
                return "element"
            return "stacked_row" if len(self.shape) == 3 and unit == self.shape[2] else "group"
        if len(segments) > 1:
            return "fused"
        if axis == 2:
            return "stacked_column" if segments[0][1] == 1 else "group"
        ((size, unit),) = segments
        if unit == size:
            return "tensor"
        if unit == 1:
            return "row" if axis == 0 else "column"
        return "head"

    def describe(self) -> str:
        """Short text for tables: ``head x4`` or ``fused q:head x4 | k:head x2 | v:row x16``."""
        kind = self.kind
        if kind in ("stacked_row", "stacked_column"):
            return f"{kind} {self.shape[0]}x{self.num_blocks // self.shape[0]}"
        if kind == "group":
            return f"group of {self.numel // self.num_blocks} x{self.num_blocks}"
        if kind == "factored":
            return f"factored {self.shape[0]}+{self.shape[1]}"
        if kind != "fused":
            return f"{kind} x{self.num_blocks}"
        axis, segments = self.geometry
        out = []
        for part, (size, unit) in zip(self.parts or ("?",) * len(segments), segments):
            kind = "tensor" if unit == size else ("head" if unit > 1 else ("row" if axis == 0 else "column"))
            out.append(f"{part[0]}:{kind} x{size // unit}")
        for k in range(1, len(out) // 2 + 1):  # a repeated pattern (per-head parts): say it once
            if len(out) % k == 0 and out == out[:k] * (len(out) // k) and len(out) > k:
                return f"fused ({' | '.join(out[:k])}) x{len(out) // k}"
        return "fused " + " | ".join(out)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "shape": list(self.shape),
            "axis": self.geometry.axis,
            "segments": [list(s) for s in self.geometry.segments],
            "role": self.role,
            "rule": self.rule,
            "weight_decay": self.weight_decay,
            "parts": list(self.parts),
            "aliases": list(self.aliases),
            **({"snr": dict(self.snr)} if self.snr else {}),
            **({"snr_choice": self.snr_choice} if self.snr_choice else {}),
            **({"trainable": False} if not self.trainable else {}),
            # derived, for readers of the JSON; ignored on load
            "kind": self.kind,
            "num_blocks": self.num_blocks,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PlanEntry:
        try:
            return cls(
                name=d["name"],
                shape=tuple(d["shape"]),
                geometry=Geometry(d["axis"], tuple(tuple(s) for s in d["segments"])),
                role=d["role"],
                rule=d["rule"],
                weight_decay=bool(d["weight_decay"]),
                parts=tuple(d.get("parts", ())),
                aliases=tuple(d.get("aliases", ())),
                snr=tuple(dict(d.get("snr", {})).items()),
                snr_choice=str(d.get("snr_choice", "")),
                trainable=bool(d.get("trainable", True)),
            )
        except KeyError as e:
            raise ValueError(f"plan entry {dict(d)!r} lacks the field {e.args[0]!r}") from None

    def same_blocks(self, other: PlanEntry) -> bool:
        """Same shape, blocks and weight-decay flag (what state depends on)."""
        return (
            self.shape == other.shape
            and self.geometry == other.geometry
            and self.weight_decay == other.weight_decay
        )


@dataclass(frozen=True)
class PartitionPlan(Mapping[str, PlanEntry]):
    """Which block every parameter belongs to. A read-only mapping name -> :class:`PlanEntry`.

    ``plan[name]`` accepts the canonical name or any alias of a tied parameter.
    ``print(plan)`` shows a table with totals; :meth:`to_json` / :meth:`from_json`
    (and :meth:`save` / :meth:`load`) round-trip it.
    """

    entries: tuple[PlanEntry, ...]
    options: Mapping[str, Any] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        index: dict[str, PlanEntry] = {}
        for e in self.entries:
            for n in (e.name, *e.aliases):
                if n in index:
                    raise ValueError(f"parameter name {n!r} appears twice in the plan")
                index[n] = e
        object.__setattr__(self, "_index", index)
        object.__setattr__(self, "entries", tuple(self.entries))

    # Mapping interface: iteration is over canonical names only.
    def __getitem__(self, name: str) -> PlanEntry:
        try:
            return self._index[name]  # type: ignore[attr-defined]
        except KeyError:
            if isinstance(name, str) and canonical_name(name) in self._index:  # type: ignore[attr-defined]
                return self._index[canonical_name(name)]  # type: ignore[attr-defined]
            raise KeyError(
                f"no parameter named {name!r} in the plan; it has {len(self.entries)} entries, "
                f"e.g. {[e.name for e in self.entries[:3]]}"
            ) from None

    def __contains__(self, name: object) -> bool:
        index = self._index  # type: ignore[attr-defined]
        return name in index or (isinstance(name, str) and canonical_name(name) in index)

    def __iter__(self) -> Iterator[str]:
        return (e.name for e in self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PartitionPlan):
            return NotImplemented
        return self.entries == other.entries

    __hash__ = None  # type: ignore[assignment]

    # Totals
    @property
    def trained(self) -> tuple[PlanEntry, ...]:
        """The entries that train (all but frozen parameters): the totals count these."""
        return tuple(e for e in self.entries if e.trainable)

    @property
    def num_params(self) -> int:
        """Parameters that train (frozen ones keep no optimizer state)."""
        return sum(e.numel for e in self.trained)

    @property
    def num_blocks(self) -> int:
        """Second-moment scalars kept by Adam-mini (AdamW keeps ``num_params``)."""
        return sum(e.num_blocks for e in self.trained)

    def state_bytes(self, state_bytes_per_value: int = 4, momentum_dtype: Any = None) -> int:
        """Adam-mini state: first moment per element plus one value per block.

        ``momentum_dtype`` as in :class:`~blockopt.AdamMini` (``torch.bfloat16`` or ``"int8"``)
        counts the compact first moment (:func:`blockopt.kernels.momentum.momentum_bytes`);
        the step counters (4 bytes per tensor) are not counted, as for AdamW.
        """
        from ..kernels.momentum import momentum_bytes, momentum_format

        fmt = momentum_format(momentum_dtype)
        if fmt == "fp32":
            return state_bytes_per_value * (self.num_params + self.num_blocks)
        return sum(momentum_bytes(fmt, e.shape) for e in self.trained) + 4 * self.num_blocks

    def adamw_state_bytes(self, state_bytes_per_value: int = 4) -> int:
        return 2 * state_bytes_per_value * self.num_params

    def counts(self) -> dict[str, int]:
        """Number of blocks by kind, e.g. ``{"head": 24, "row": 960, ...}``."""
        out: dict[str, int] = {}
        for e in self.trained:
            out[e.kind] = out.get(e.kind, 0) + e.num_blocks
        return out

    # Serialisation
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": _PLAN_FORMAT,
            "options": dict(self.options),
            "warnings": list(self.warnings),
            "entries": [e.to_dict() for e in self.entries],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PartitionPlan:
        if not isinstance(d, Mapping) or "entries" not in d:
            raise ValueError("not a blockopt plan: expected a mapping with an 'entries' list")
        if d.get("format", _PLAN_FORMAT) != _PLAN_FORMAT:
            raise ValueError(f"plan format {d.get('format')!r} is not supported; expected {_PLAN_FORMAT}")
        return cls(
            entries=tuple(PlanEntry.from_dict(e) for e in d["entries"]),
            options=dict(d.get("options", {})),
            warnings=tuple(d.get("warnings", ())),
        )

    def to_json(self, indent: int | None = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_json(cls, text: str) -> PartitionPlan:
        return cls.from_dict(json.loads(text))

    def save(self, path: str | os.PathLike) -> None:
        with open(path, "w", encoding="utf-8") as f:
            f.write(self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike) -> PartitionPlan:
        with open(path, encoding="utf-8") as f:
            return cls.from_json(f.read())

    def replace_entries(self, entries: Mapping[str, PlanEntry]) -> PartitionPlan:
        """A new plan with some entries swapped (keyed by canonical name)."""
        unknown = [n for n in entries if n not in self]
        if unknown:
            raise KeyError(f"entries for unknown parameters: {unknown}")
        new = tuple(entries.get(e.name, e) for e in self.entries)
        return replace(self, entries=new)

    # Display
    def table(self, max_rule: int = 72) -> str:
        with_snr = any(e.snr or e.snr_choice for e in self.entries)
        header = ("parameter", "shape", "blocks", "role", "decay", *(("snr",) if with_snr else ()), "rule")
        rows = [
            (
                e.name + (f" (= {', '.join(e.aliases)})" if e.aliases else ""),
                "x".join(map(str, e.shape)) or "scalar",
                e.describe() + ("" if e.trainable else " (frozen)"),
                e.role,
                "yes" if e.weight_decay else "no",
                *((_snr_cell(e),) if with_snr else ()),
                e.rule if len(e.rule) <= max_rule else e.rule[: max_rule - 3] + "...",
            )
            for e in self.entries
        ]
        widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
        line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()
        out = [line(header), line(tuple("-" * w for w in widths))]
        out += [line(r) for r in rows]
        n, v = self.num_params, self.num_blocks
        ours, adamw = self.state_bytes(), self.adamw_state_bytes()
        out.append("")
        frozen = len(self.entries) - len(self.trained)
        out.append(
            f"{len(self.entries)} tensors{f' ({frozen} frozen, not counted)' if frozen else ''}, {n:,} "
            f"{'trainable ' if frozen else ''}parameters, {v:,} second-moment values (AdamW: {n:,})"
        )
        out.append(
            f"fp32 state: {_fmt_bytes(ours)} vs AdamW {_fmt_bytes(adamw)} "
            f"({ours / adamw if adamw else 0:.3f}x)"
        )
        out += self._storage_lines()
        budget = self.options.get("state_budget")
        if budget is not None:
            bought = [e for e in self.trained if e.rule.startswith("state budget")]
            out.append(f"state budget {budget:g}x of AdamW's: per-element second moments for {len(bought)} tensors "
                       f"({sum(e.numel for e in bought):,} parameters)"
                       + (f", first {bought[0].name}" if bought else ""))
        by_kind = ", ".join(f"{k} {c:,}" for k, c in sorted(self.counts().items()))
        out.append(f"blocks by kind: {by_kind}")
        for w in self.warnings:
            out.append(f"warning: {w}")
        return "\n".join(out)

    def _storage_lines(self) -> list[str]:
        """With compact momentum or weights (``options["momentum"]``, ``options["weights"]``, set by
        :class:`~blockopt.AdamMini`): the stored state and the bytes per parameter of weights + state."""
        from ..kernels.weights import weight_bytes

        momentum, weights = self.options.get("momentum"), self.options.get("weights")
        if momentum is None and weights is None:
            return []
        n = self.num_params
        state = self.state_bytes(momentum_dtype=momentum)
        w = weight_bytes(weights)
        out = []
        if momentum is not None:
            out.append(f"{momentum} momentum: state {_fmt_bytes(state)} ({state / self.adamw_state_bytes():.3f}x "
                       "of AdamW's)")
        where = f"weights {weights} ({w} B)" if weights else "fp32 weights (4 B)"
        out.append(f"{where} + state: {w + state / n:.2f} bytes per parameter (AdamW fp32: 12; gradients not "
                   "counted)" if n else f"{where}")
        return out

    def __str__(self) -> str:
        return self.table()

    def __repr__(self) -> str:
        return (
            f"PartitionPlan({len(self.entries)} tensors, {self.num_params:,} parameters, "
            f"{self.num_blocks:,} blocks)"
        )


def _snr_cell(e: PlanEntry) -> str:
    """``row 4.72`` (the chosen candidate's SNR), ``element (best 0.79)``, or ``-``."""
    snr = dict(e.snr)
    if not e.snr_choice:
        return "-"
    if e.snr_choice in snr:
        return f"{e.snr_choice} {snr[e.snr_choice]:.2f}"
    if e.snr_choice == "element" and snr:
        return f"element (best {max(snr.values()):.2f})"
    return e.snr_choice


