"""The partition engine: one decision per parameter, from the model's structure.

Rules, in the order they are tried for each parameter (``docs/partition.md`` states them all,
including stacked mixture-of-experts weights, routers, multi-head latent attention and LoRA
adapters, which the passes ``_decide_experts``, ``_decide_mla`` and ``_set`` handle):

1. **User overrides** (``overrides={pattern: spec}``; ``re.fullmatch`` on the
   parameter name or any alias) win over every rule below.
2. **Bias** (a 1-D parameter registered as ``bias`` or ``*_bias``): one block
   per element (plain Adam), no weight decay.
3. **Norm** modules (``LayerNorm``, ``RMSNorm``, ``GroupNorm``, batch/instance
   norms, and any module class whose name ends in ``Norm``): one block per
   tensor, no weight decay.
4. **Embedding** (``nn.Embedding``/``nn.EmbeddingBag``): one block per row
   (token). A position embedding, recognised as an embedding that is not the
   model's input embedding and whose module name contains ``pos``/``wpe``/
   ``position`` (a documented name fallback), is one block.
5. **Attention projections**, found inside attention modules
   (``nn.MultiheadAttention``; a module with head-count attributes such as
   ``num_heads``/``head_dim``; or, as a documented fallback, a module whose
   class name contains ``Attention``/``Attn``). Query and key: one block per
   head; value and output projection: one block per output neuron (value: one
   block if ``value_single_block=True``). Fused QKV weights (``c_attn`` of
   GPT-2's ``Conv1D``, ``in_proj_weight``, any projection whose output size is
   ``q + 2 * kv``) are split into their parts. Which child is query, key or
   value is read from its name (``q_proj``, ``query``, ``wq``, ...) and, where
   names say nothing, from registration order (q, k, v).
   Head counts: hints (``num_heads``, ``num_kv_heads``, ``head_dim``) first,
   then the module's attributes, then the model's config (Hugging Face
   ``num_attention_heads``, ``num_key_value_heads``, ``head_dim``), then what
   the shapes imply. GQA and ``heads * head_dim != hidden`` are handled.
6. **Linear** and Hugging Face **Conv1D** elsewhere (MLP, output head): one
   block per output neuron (rows; columns for ``Conv1D``). A tied output head
   is the embedding's parameter: one parameter, one state. The output head
   (role ``output``) is ``get_output_embeddings()``, or a projection shaped
   like the input embedding's table; without ``get_input_embeddings()`` the
   input embedding is the model's only ``nn.Embedding`` not named as a
   position table.
7. **Convolutions**: one block per output channel.
8. Other tensors: 0-D/1-D, one block, no decay; >= 2-D, one block per output
   row (dim 0), listed in one warning.

Building a plan reads only shapes and module types: it allocates no
parameter-sized memory and works on the ``meta`` device.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..kernels.blocks import Geometry, factored_geometry
from .budget import apply_state_budget, check_state_budget
from .factored import factor_matrices
from .plan import PartitionPlan, PlanEntry, canonical_name

__all__ = ["OVERRIDE_KINDS", "check_patterns_matched", "compile_override_pattern", "parse_override", "partition", "user_kind_names"]

#: kinds accepted by ``overrides``
OVERRIDE_KINDS = ("element", "tensor", "row", "column", "head", "stacked_row", "stacked_column", "factored")

_HEAD_ATTRS = ("num_heads", "n_heads", "num_attention_heads", "n_head", "nhead", "num_q_heads")
_KV_ATTRS = ("num_kv_heads", "num_key_value_heads", "n_kv_heads", "n_kv_head", "num_query_groups")
_HEAD_DIM_ATTRS = ("head_dim", "attention_head_size", "head_size", "d_head", "dim_head")
_GROUP_ATTRS = ("num_key_value_groups", "n_rep")

_Q_NAMES = {"q_proj", "query", "wq", "q", "to_q", "q_lin", "q_attn", "query_proj", "q_linear"}
_K_NAMES = {"k_proj", "key", "wk", "k", "to_k", "k_lin", "key_proj", "k_linear"}
_V_NAMES = {"v_proj", "value", "wv", "v", "to_v", "v_lin", "value_proj", "v_linear"}
_O_NAMES = {"o_proj", "out_proj", "wo", "o", "to_out", "out_lin", "c_proj", "proj", "dense",
            "out", "output", "o_linear", "out_linear"}
_FUSED_NAMES = {"c_attn", "qkv", "qkv_proj", "wqkv", "in_proj", "query_key_value", "to_qkv",
                "qkv_linear"}
_MLA_Q_A = {"q_a_proj", "wq_a"}
_MLA_Q_B = {"q_b_proj", "wq_b"}
_MLA_KV_A = {"kv_a_proj_with_mqa", "wkv_a", "kv_a_proj"}
_MLA_KV_B = {"kv_b_proj", "wkv_b"}
_MLA_DIMS = {
    "heads": _HEAD_ATTRS,
    "nope": ("qk_nope_head_dim",),
    "rope": ("qk_rope_head_dim",),
    "v": ("v_head_dim",),
}
_EXPERT_ATTRS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts", "n_experts",
                 "num_routed_experts")
_HIDDEN_ATTRS = ("hidden_size", "d_model", "n_embd", "dim", "hidden_dim")
_POSITION_RE = re.compile(r"(pos|wpe|position)", re.IGNORECASE)

_NORM_TYPES: tuple[type, ...] = (
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    nn.modules.batchnorm._NormBase,
) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())


def _is_norm(m: nn.Module) -> bool:
    return isinstance(m, _NORM_TYPES) or type(m).__name__.lower().endswith("norm")


def _is_hf_conv1d(m: nn.Module) -> bool:
    # transformers.pytorch_utils.Conv1D: weight [in, out], output neurons in columns
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf") and hasattr(m, "weight")


def _is_projection(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or _is_hf_conv1d(m)


def _base(m: nn.Module) -> nn.Module | None:
    """The projection a module is or wraps (a peft LoRA layer keeps it as ``base_layer``), else None."""
    for _ in range(4):
        if _is_projection(m):
            return m
        inner = getattr(m, "base_layer", None)
        if not isinstance(inner, nn.Module):
            return None
        m = inner
    return None


def _out_axis(m: nn.Module) -> int:
    return 1 if _is_hf_conv1d(m) else 0


def _in_out(m: nn.Module) -> tuple[int, int]:
    shape = tuple(m.weight.shape)
    return (shape[0], shape[1]) if _is_hf_conv1d(m) else (shape[1], shape[0])


def _int_attr(obj: Any, names: tuple[str, ...]) -> tuple[int | None, str | None]:
    if obj is None:
        return None, None
    for n in names:
        v = getattr(obj, n, None)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v, n
    return None, None


def _check_hint(name: str, value: Any) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"Invalid {name}: {value!r}; expected a positive int or None")


@dataclass
class _Heads:
    num_heads: int
    num_kv_heads: int
    head_dim: int
    source: str

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim


@dataclass
class _Decision:
    geometry: Geometry
    role: str
    rule: str
    weight_decay: bool
    parts: tuple[str, ...] = ()


def _rows(shape: tuple[int, ...], axis: int = 0, unit: int = 1) -> Geometry:
    return Geometry(axis, ((shape[axis], unit),))


def _whole(shape: tuple[int, ...]) -> Geometry:
    n = 1
    for s in shape:
        n *= s
    return Geometry(-1, ((n, n),))


def _elements(shape: tuple[int, ...]) -> Geometry:
    n = 1
    for s in shape:
        n *= s
    return Geometry(-1, ((n, 1),))


class _Engine:
    def __init__(
        self,
        model: nn.Module,
        hints: dict[str, int | None],
        value_single_block: bool,
        config: Any,
    ) -> None:
        self.model = model
        self.hints = hints
        self.value_single_block = value_single_block
        self.config = config if config is not None else getattr(model, "config", None)
        self.decisions: dict[int, _Decision] = {}  # id(param) -> decision
        self.attention_modules: set[int] = set()
        self.unknown: dict[int, str] = {}  # id(param) -> description, for the one warning
        self.heads_used = False
        self.expert_modules: set[int] = set()

    # --- structure ------------------------------------------------------
    def _input_output_embeddings(self) -> tuple[nn.Module | None, nn.Module | None]:
        def call(name: str) -> nn.Module | None:
            fn = getattr(self.model, name, None)
            if not callable(fn):
                return None
            try:
                out = fn()
            except (NotImplementedError, AttributeError, TypeError):
                return None
            return out if isinstance(out, nn.Module) else None

        in_emb, out_emb = call("get_input_embeddings"), call("get_output_embeddings")
        # a LoRA-wrapped head or table: the layer inside
        if out_emb is not None and _base(out_emb) is not None:
            out_emb = _base(out_emb)
        if in_emb is not None and not isinstance(in_emb, (nn.Embedding, nn.EmbeddingBag)):
            inner = getattr(in_emb, "base_layer", None)
            in_emb = inner if isinstance(inner, nn.Module) else in_emb
        if in_emb is None:
            # no get_input_embeddings (torchtitan, nanoGPT and other plain models): the model's one
            # embedding table that is not a position table, so that the output head is still found
            tables = [m for n, m in self.model.named_modules()
                      if isinstance(m, nn.Embedding) and not _POSITION_RE.search(n.rsplit(".", 1)[-1])]
            if len(tables) == 1:
                in_emb = tables[0]
        return in_emb, out_emb

    def _is_attention(self, m: nn.Module) -> bool:
        if isinstance(m, nn.MultiheadAttention):
            return True
        if _base(m) is not None:  # a projection (or a LoRA wrapper of one) is not an attention module
            return False
        named = any(s in type(m).__name__.lower() for s in ("attention", "attn"))
        has_heads = any(_int_attr(m, a)[0] for a in (_HEAD_ATTRS, _HEAD_DIM_ATTRS))
        projections = [c for c in m.children() if _base(c) is not None]
        return (named or has_heads) and len(projections) >= 1 and (
            named or len(projections) >= 2
        )

    def _heads(self, m: nn.Module, mname: str, q_out: int | None, k_out: int | None = None) -> _Heads | None:
        """Head counts for attention module ``m``; ``None`` when nothing says."""
        h, dh, kv = self.hints["num_heads"], self.hints["head_dim"], self.hints["num_kv_heads"]
        src = []
        if h is not None or dh is not None or kv is not None:
            src.append("hints")
        mod_cfg = getattr(m, "config", None)
        for obj, label in ((m, "module"), (mod_cfg, "config"), (self.config, "config")):
            if obj is None:
                continue
            if h is None:
                h, attr = _int_attr(obj, _HEAD_ATTRS if label == "module" else ("num_attention_heads",) + _HEAD_ATTRS)
                if h is not None:
                    src.append(f"{label}.{attr}")
            if dh is None:
                dh, attr = _int_attr(obj, _HEAD_DIM_ATTRS)
                if dh is not None:
                    src.append(f"{label}.{attr}")
            if kv is None:
                kv, attr = _int_attr(obj, ("num_key_value_heads",) + _KV_ATTRS)
                if kv is not None:
                    src.append(f"{label}.{attr}")
        if kv is None and h is not None:
            groups, attr = _int_attr(m, _GROUP_ATTRS)
            if groups is not None and h % groups == 0:
                kv = h // groups
                src.append(f"{attr}")
        if q_out is not None:
            if h is None and dh is not None and q_out % dh == 0:
                h = q_out // dh
                src.append("query shape")
            if dh is None and h is not None and q_out % h == 0:
                dh = q_out // h
                src.append("query shape")
        if h is None or dh is None:
            if "hints" in src and q_out is not None:
                given = ", ".join(f"{k}={v}" for k, v in self.hints.items() if v is not None)
                raise ValueError(
                    f"Invalid head hints ({given}): the query of {mname or type(m).__name__} has "
                    f"{q_out} output features, which they do not divide into heads"
                )
            return None
        if kv is None and k_out is not None and k_out % dh == 0:
            kv = k_out // dh
            src.append("key shape")
        if kv is None:
            kv = h
        self.heads_used = True
        return _Heads(h, kv, dh, "+".join(dict.fromkeys(src)) or "shapes")

    def _fail_heads(self, what: str, pname: str, shape: tuple[int, ...], heads: _Heads, size: int) -> None:
        """Head counts that do not tile a projection: an error if they came from hints."""
        msg = (
            f"{what} {pname!r} of shape {list(shape)} has {size} output features, which "
            f"{heads.num_heads if what != 'key' else heads.num_kv_heads} heads of head_dim="
            f"{heads.head_dim} do not fill"
        )
        if "hints" in heads.source:
            hint_vals = ", ".join(f"{k}={v}" for k, v in self.hints.items() if v is not None)
            raise ValueError(f"Invalid head hints ({hint_vals}): {msg}")
        warnings.warn(f"blockopt.partition: {msg} (heads from {heads.source}); using one block per row", stacklevel=4)

    def _decide_attention(self, m: nn.Module, mname: str, names: dict[int, str]) -> None:
        if isinstance(m, nn.MultiheadAttention):
            self._decide_mha(m, mname, names)
            return
        children = [(n, c) for n, c in m.named_children() if _base(c) is not None]
        if not children:
            return
        if self._decide_mla(m, mname, names, children):
            return
        roles: dict[str, str] = {}
        for n, c in children:
            low = n.lower()
            for role, table in (("query", _Q_NAMES), ("key", _K_NAMES), ("value", _V_NAMES),
                                ("attn_out", _O_NAMES), ("qkv", _FUSED_NAMES)):
                if low in table:
                    roles[n] = role
                    break
        unnamed = [c for n, c in children if n not in roles]
        q_child = next((c for n, c in children if roles.get(n) == "query"), None)
        k_child = next((c for n, c in children if roles.get(n) == "key"), None)
        if q_child is None and "qkv" not in roles.values() and len(unnamed) >= 2:
            # projections placed by order (q, k, v, out): the first unnamed one is the query
            q_child = unnamed[0]
            k_child = k_child if k_child is not None else unnamed[1]
        q_out = _in_out(_base(q_child))[1] if q_child is not None else None
        k_out = _in_out(_base(k_child))[1] if k_child is not None else None
        heads = self._heads(m, mname, q_out, k_out)
        # by shape and order for children the names did not place
        missing = [r for r in ("query", "key", "value") if r not in roles.values()]
        for n, c in children:
            if n in roles:
                continue
            i, o = _in_out(_base(c))
            if heads is not None and o == heads.q_size + 2 * heads.kv_size and "qkv" not in roles.values():
                roles[n] = "qkv"
            elif heads is not None and i == heads.q_size and (not missing or o != heads.kv_size):
                roles[n] = "attn_out"
            elif missing:
                roles[n] = missing.pop(0)
            else:
                roles[n] = "attn_out"
        for n, c in children:
            self._decide_projection(c, f"{mname}.{n}" if mname else n, roles[n], heads, names, n)

    def _decide_mla(self, m: nn.Module, mname: str, names: dict[int, str],
                    children: list[tuple[str, nn.Module]]) -> bool:
        """Multi-head latent attention (DeepSeek-V2/V3): low-rank query and key/value projections.

        ``q_b_proj`` (or ``q_proj`` without a query rank): one block per head of ``nope + rope``
        rows; ``kv_b_proj``: per head, its ``nope`` key rows one block and its value rows one
        block each; ``kv_a_proj_with_mqa``: the latent rows one block each, the shared rope key
        one block; ``q_a_proj``: per row. False when the module is not MLA.
        """
        local = {n.lower(): c for n, c in children}
        kv_b = next((local[n] for n in _MLA_KV_B if n in local), None)
        if kv_b is None:
            return False
        dims = {}
        for key, attrs in _MLA_DIMS.items():
            for obj in (m, getattr(m, "config", None), self.config):
                v, _ = _int_attr(obj, attrs)
                if v is not None:
                    dims[key] = v
                    break
        h = self.hints["num_heads"] or dims.get("heads")
        nope, rope, vd = dims.get("nope"), dims.get("rope"), dims.get("v")
        if not (h and nope and rope and vd):
            return False
        self.heads_used = True
        src = "MLA dims (qk_nope_head_dim, qk_rope_head_dim, v_head_dim, heads)"
        for n, c in children:
            base = _base(c)
            w = base.weight
            shape = tuple(w.shape)
            axis = _out_axis(base)
            out = shape[axis]
            pname = names.get(id(w), f"{mname}.{n}.weight" if mname else f"{n}.weight")
            low = n.lower()
            geom, role, parts = _rows(shape, axis), "attn_out", ()
            if low in _MLA_Q_B or low in _Q_NAMES:
                role = "query"
                if out == h * (nope + rope):
                    geom, rule = _rows(shape, axis, nope + rope), f"MLA query ({n!r}): {h} heads x {nope}+{rope} [{src}]"
                else:
                    rule = f"MLA query ({n!r}): {out} rows do not fit {h} heads x {nope + rope}, per row"
                    self.unknown[id(w)] = f"{pname} (MLA query; heads do not fit, one block per row)"
            elif low in _MLA_KV_B:
                role = "qkv"
                if out == h * (nope + vd):
                    segs = ((nope, nope), (vd, 1)) * h
                    geom, parts = Geometry(axis, segs), ("key", "value") * h
                    rule = f"MLA key/value up-projection ({n!r}): per head, key {nope} rows one block, value per row [{src}]"
                else:
                    rule = f"MLA key/value ({n!r}): {out} rows do not fit {h} heads x ({nope}+{vd}), per row"
                    self.unknown[id(w)] = f"{pname} (MLA key/value; heads do not fit, one block per row)"
            elif low in _MLA_KV_A:
                role = "qkv"
                if out > rope:
                    geom, parts = Geometry(axis, ((out - rope, 1), (rope, rope))), ("value", "key")
                    rule = f"MLA latent ({n!r}): latent rows per row, shared rope key ({rope} rows) one block"
                else:
                    rule = f"MLA latent ({n!r}): per row"
            elif low in _MLA_Q_A:
                role, rule = "query", f"MLA query down-projection ({n!r}): per output neuron"
            else:
                rule = f"attention output ({n!r}): per output neuron"
            self._set(c, base, _Decision(geom, role, rule, True, parts))
        return True

    def _set(self, c: nn.Module, base: nn.Module, d: _Decision) -> None:
        """Record the decision for ``base.weight`` and, when ``c`` wraps ``base`` (LoRA), its adapters."""
        self.decisions[id(base.weight)] = d
        if c is base:
            return
        axis, segments = d.geometry
        out_axis = _out_axis(base)
        out = tuple(base.weight.shape)[out_axis]
        for an, a in c.named_modules():
            if a is base or not isinstance(a, nn.Linear) or any(x is a for x in base.modules()):
                continue
            w = a.weight
            shape = tuple(w.shape)
            if shape[0] == out and axis in (0, 1):  # adapter B: its rows are the layer's output neurons
                geom = Geometry(0, segments)
                rule = f"LoRA adapter {an!r} of {d.role}: the wrapped layer's blocks on its rows ({d.rule})"
                self.decisions[id(w)] = _Decision(geom, d.role, rule, True, d.parts)
            else:  # adapter A (or B of a layer without output blocks): per row
                self.decisions[id(w)] = _Decision(_rows(shape), d.role, f"LoRA adapter {an!r} of {d.role}: per row", True)

    def _decide_projection(
        self, c: nn.Module, cname: str, role: str, heads: _Heads | None, names: dict[int, str], local: str
    ) -> None:
        wrapper, c = c, _base(c)
        self._decide_projection_weight(c, cname, role, heads, names, local)
        self._set(wrapper, c, self.decisions[id(c.weight)])

    def _decide_projection_weight(
        self, c: nn.Module, cname: str, role: str, heads: _Heads | None, names: dict[int, str], local: str
    ) -> None:
        w = c.weight
        shape = tuple(w.shape)
        axis = _out_axis(c)
        out = shape[axis]
        how = f"name {local!r}" if local.lower() in (_Q_NAMES | _K_NAMES | _V_NAMES | _O_NAMES | _FUSED_NAMES) else "shape/order"
        pname = names.get(id(w), cname + ".weight")
        if role in ("query", "key"):
            if heads is None:
                self.unknown[id(w)] = f"{pname} ({role}; no head count found, one block per row)"
                self.decisions[id(w)] = _Decision(_rows(shape, axis), role, f"attention {role} ({how}), heads unknown: per row", True)
                return
            n_heads = heads.num_heads if role == "query" else heads.num_kv_heads
            if out != n_heads * heads.head_dim:
                self._fail_heads(role, pname, shape, heads, out)
                self.decisions[id(w)] = _Decision(_rows(shape, axis), role, f"attention {role} ({how}): heads do not fit, per row", True)
                return
            self.decisions[id(w)] = _Decision(
                _rows(shape, axis, heads.head_dim), role,
                f"attention {role} ({how}): {n_heads} heads x {heads.head_dim} [{heads.source}]", True,
            )
        elif role == "value":
            geom = _whole(shape) if self.value_single_block else _rows(shape, axis)
            extra = "one block (value_single_block)" if self.value_single_block else "per output neuron"
            self.decisions[id(w)] = _Decision(geom, role, f"attention value ({how}): {extra}", True)
        elif role == "attn_out":
            self.decisions[id(w)] = _Decision(_rows(shape, axis), role, f"attention output ({how}): per output neuron", True)
        elif role == "qkv":
            self._decide_fused(shape, axis, heads, pname, f"fused qkv ({how})", id(w))
        else:  # pragma: no cover - roles above are exhaustive
            raise AssertionError(role)

    def _decide_fused(self, shape: tuple[int, ...], axis: int, heads: _Heads | None, pname: str, what: str, key: int) -> None:
        out = shape[axis]
        if heads is None:
            self.unknown[key] = f"{pname} (fused qkv; no head count found, one block per row)"
            self.decisions[key] = _Decision(_rows(shape, axis), "qkv", f"{what}, heads unknown: per row", True)
            return
        q, kv = heads.q_size, heads.kv_size
        if out != q + 2 * kv:
            self._fail_heads("fused qkv", pname, shape, heads, out)
            self.decisions[key] = _Decision(_rows(shape, axis), "qkv", f"{what}: heads do not fit, per row", True)
            return
        v_unit = kv if self.value_single_block else 1
        geom = Geometry(axis, ((q, heads.head_dim), (kv, heads.head_dim), (kv, v_unit)))
        self.decisions[key] = _Decision(
            geom, "qkv",
            f"{what}: q {heads.num_heads} heads, k {heads.num_kv_heads} heads x {heads.head_dim}, "
            f"v {'one block' if self.value_single_block else 'per neuron'} [{heads.source}]",
            True, parts=("query", "key", "value"),
        )

    def _decide_mha(self, m: nn.MultiheadAttention, mname: str, names: dict[int, str]) -> None:
        hint_h, hint_dh = self.hints["num_heads"], self.hints["head_dim"]
        hint_kv = self.hints["num_kv_heads"]
        if hint_kv is not None and hint_kv != (hint_h or m.num_heads):
            raise ValueError(
                f"Invalid num_kv_heads: {hint_kv}; {mname or 'nn.MultiheadAttention'} has no grouped-query "
                f"attention, so its key heads equal its query heads ({hint_h or m.num_heads})"
            )
        h = hint_h or (m.embed_dim // hint_dh if hint_dh else m.num_heads)
        dh = hint_dh or m.embed_dim // h
        src = "hints" if (hint_h or hint_dh) else "module.num_heads"
        if h * dh != m.embed_dim:
            raise ValueError(
                f"Invalid head hints (num_heads={hint_h}, head_dim={hint_dh}): "
                f"{mname or 'MultiheadAttention'} has embed_dim={m.embed_dim}, not num_heads * head_dim"
            )
        heads = _Heads(h, h, dh, src)
        self.heads_used = True
        prefix = f"{mname}." if mname else ""
        if m.in_proj_weight is not None:
            w = m.in_proj_weight
            self._decide_fused(tuple(w.shape), 0, heads, names.get(id(w), prefix + "in_proj_weight"),
                               "MultiheadAttention in_proj_weight", id(w))
        else:
            for attr, role in (("q_proj_weight", "query"), ("k_proj_weight", "key"), ("v_proj_weight", "value")):
                w = getattr(m, attr)
                shape = tuple(w.shape)
                if role == "value":
                    geom = _whole(shape) if self.value_single_block else _rows(shape)
                    rule = "MultiheadAttention value: " + ("one block (value_single_block)" if self.value_single_block else "per output neuron")
                else:
                    geom = _rows(shape, 0, heads.head_dim)
                    rule = f"MultiheadAttention {role}: {h} heads x {dh} [{src}]"
                self.decisions[id(w)] = _Decision(geom, role, rule, True)
        ow = m.out_proj.weight
        self.decisions[id(ow)] = _Decision(_rows(tuple(ow.shape)), "attn_out", "MultiheadAttention out_proj: per output neuron", True)

    def _vocab_shaped_heads(self, in_emb: nn.Module | None, out_emb: nn.Module | None) -> set[int]:
        """Projections taken for an untied output head by shape ([vocab, d], like the input embedding),
        when the model names no output embedding. Several matches (an MLP whose width equals the
        vocabulary, in every layer) keep only those outside numbered layers (``layers.3.``)."""
        if out_emb is not None or not isinstance(in_emb, nn.Embedding):
            return set()
        want = (in_emb.num_embeddings, in_emb.embedding_dim)
        found = [(n, m) for n, m in self.model.named_modules() if _is_projection(m) and _in_out(m)[::-1] == want]
        if len(found) > 1:
            found = [(n, m) for n, m in found if not re.search(r"(^|\.)\d+(\.|$)", n)]
        return {id(m) for _, m in found}

    # --- mixture of experts -------------------------------------------------
    def _num_experts(self, m: nn.Module) -> int | None:
        for obj in (m, getattr(m, "config", None), self.config):
            v, _ = _int_attr(obj, _EXPERT_ATTRS)
            if v is not None:
                return v
        return None

    def _hidden_size(self, m: nn.Module) -> int | None:
        for obj in (getattr(m, "config", None), self.config):
            v, _ = _int_attr(obj, _HIDDEN_ATTRS)
            if v is not None:
                return v
        return None

    def _decide_experts(self, m: nn.Module, mname: str, names: dict[int, str]) -> None:
        """Stacked experts: a module's own 3-D parameters whose dim 0 is its number of experts.

        ``[E, out, in]``: one block per expert and output neuron (runs of ``in`` elements);
        ``[E, in, out]`` (``is_transposed``, or what the hidden size implies): the same blocks,
        as stacked columns. Expert biases ``[E, out]``: per element.
        """
        own = list(m.named_parameters(recurse=False))
        stacked = [(n, p) for n, p in own if p.dim() == 3]
        if not stacked:
            return
        e = self._num_experts(m)
        if e is None:  # no count anywhere: two or more 3-D tensors with one leading size
            lead = {p.shape[0] for _, p in stacked}
            if len(stacked) < 2 or len(lead) != 1:
                return
            e, how_e = lead.pop(), "shared leading size"
        else:
            how_e = "num_experts"
        flag = getattr(m, "is_transposed", None)
        hidden = self._hidden_size(m)
        for n, p in own:
            shape = tuple(p.shape)
            if not shape or shape[0] != e:
                continue
            if p.dim() == 2 and (n == "bias" or n.endswith("_bias") or n.startswith("bias")):
                self.decisions[id(p)] = _Decision(_elements(shape), "bias", "expert bias [E, out]: per element (Adam)", False)
                continue
            if p.dim() != 3:
                continue
            if isinstance(flag, bool):
                transposed, why = flag, f"is_transposed={flag}"
            else:
                transposed, why = self._expert_layout(n, shape, hidden)
            if transposed:
                geom = Geometry(2, ((shape[0] * shape[2], 1),))
                rule = f"stacked experts [E, in, out] ({why}): per expert and output neuron (column) [{how_e}]"
            else:
                geom = Geometry(-1, ((math.prod(shape), shape[2]),))
                rule = f"stacked experts [E, out, in] ({why}): per expert and output neuron (row) [{how_e}]"
            self.decisions[id(p)] = _Decision(geom, "mlp", rule, True)
        self.expert_modules.add(id(m))

    @staticmethod
    def _expert_layout(name: str, shape: tuple[int, ...], hidden: int | None) -> tuple[bool, str]:
        """Whether ``[E, a, b]`` is stored ``[E, in, out]``: a down projection's output is the hidden
        size, any other projection's input is; square or unknown: PyTorch's ``[out, in]``."""
        if hidden is None:
            return False, "layout [E, out, in] by convention"
        down = "down" in name.lower() or name.lower() in ("w2", "wo")
        a, b = shape[1], shape[2]
        if down:
            normal, transposed = a == hidden, b == hidden
        else:
            normal, transposed = b == hidden, a == hidden
        if transposed and not normal:
            return True, f"hidden size {hidden} on the input side"
        return False, (f"hidden size {hidden}" if normal and not transposed else "layout [E, out, in] by convention")

    def _is_router(self, m: nn.Module, mname: str, local: str, shape: tuple[int, ...]) -> bool:
        """A router (gate): a ``[E, hidden]`` weight in a module named or typed as a gate or router."""
        if local != "weight" or len(shape) != 2:
            return False
        e = self._num_experts(m)
        leaf = mname.rsplit(".", 1)[-1].lower()
        named = any(s in type(m).__name__.lower() for s in ("router", "gate")) or leaf in ("gate", "router", "wg")
        return named and e is not None and shape[0] == e

    # --- main -------------------------------------------------------------
    def run(self) -> dict[int, _Decision]:
        model = self.model
        names: dict[int, str] = {}
        for n, p in model.named_parameters():
            names.setdefault(id(p), n)
        in_emb, out_emb = self._input_output_embeddings()
        self._vocab_shaped = self._vocab_shaped_heads(in_emb, out_emb)
        embedding_weights = {id(m.weight) for m in model.modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag))}

        # attention modules and stacked experts first: their decisions take precedence over "Linear"
        attn_subtree: set[int] = set()
        for mname, m in model.named_modules():
            self._decide_experts(m, mname, names)
            if self._is_attention(m):
                self.attention_modules.add(id(m))
                self._decide_attention(m, mname, names)
            if any(s in type(m).__name__.lower() for s in ("attention", "attn")) or id(m) in self.attention_modules:
                attn_subtree.update(id(x) for x in m.modules())

        for mname, m in model.named_modules():
            for local, p in m.named_parameters(recurse=False):
                if id(p) in self.decisions:
                    continue
                pname = names.get(id(p), f"{mname}.{local}" if mname else local)
                self.decisions[id(p)] = self._decide_param(m, mname, local, p, pname, in_emb, out_emb, embedding_weights, attn_subtree)
        return self.decisions

    def _decide_param(self, m, mname, local, p, pname, in_emb, out_emb, embedding_weights, attn_subtree) -> _Decision:
        shape = tuple(p.shape)
        if p.dim() == 1 and (local == "bias" or local.endswith("_bias")):
            return _Decision(_elements(shape), "bias", "bias: per element (Adam)", False)
        if self._is_router(m, mname, local, shape):
            return _Decision(_rows(shape), "router", f"router ({type(m).__name__}): per expert (row)", True)
        if _is_norm(m):
            return _Decision(_whole(shape), "norm", f"norm ({type(m).__name__}): one block", False)
        if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and local == "weight":
            last = mname.rsplit(".", 1)[-1]
            if m is not in_emb and _POSITION_RE.search(last):
                return _Decision(_whole(shape), "position_embedding", f"position embedding (name {last!r}): one block", True)
            return _Decision(_rows(shape), "embedding", f"{type(m).__name__}: per token (row)", True)
        if _is_projection(m) and local == "weight":
            axis = _out_axis(m)
            _i, _o = _in_out(m)
            if (m is out_emb or id(m) in self._vocab_shaped) and id(m) not in attn_subtree:
                return _Decision(_rows(shape, axis), "output", "output head: per token (row)", True)
            role = "attn_out" if id(m) in attn_subtree else "mlp"
            where = "inside attention" if role == "attn_out" else "MLP/linear"
            kind = "column (Conv1D stores [in, out])" if axis == 1 else "row"
            return _Decision(_rows(shape, axis), role, f"{type(m).__name__} {where}: per output neuron, {kind}", True)
        if isinstance(m, nn.modules.conv._ConvNd) and local == "weight":
            axis = 1 if m.transposed else 0
            rule = f"{type(m).__name__}: per output channel"
            if m.transposed and m.groups > 1:
                rule = f"{type(m).__name__} (groups={m.groups}): a block is one output column across all groups"
            return _Decision(_rows(shape, axis), "conv", rule, True)
        if p.dim() <= 1:
            return _Decision(_whole(shape), "other", f"{p.dim()}-D tensor: one block", False)
        self.unknown[id(p)] = f"{pname} {list(shape)} in {type(m).__name__}"
        return _Decision(_rows(shape), "other", "unknown >= 2-D tensor: per row of dim 0 (default)", True)


def parse_override(pattern: str, spec: Any) -> dict[str, Any]:
    if isinstance(spec, str):
        kind, _, arg = spec.partition(":")
        spec = {"kind": kind}
        if arg:
            try:
                spec["head_dim"] = int(arg)
            except ValueError:
                raise ValueError(f"Invalid overrides[{pattern!r}]: {arg!r} in {kind + ':' + arg!r} is not an int head_dim") from None
    if not isinstance(spec, Mapping):
        raise ValueError(  # noqa: TRY004 - bad input is a ValueError naming the argument (house rule)
            f"Invalid overrides[{pattern!r}]: {spec!r}; expected a kind ({', '.join(OVERRIDE_KINDS)}, "
            f"'head:<head_dim>') or a dict with keys kind, head_dim, weight_decay"
        )
    bad = set(spec) - {"kind", "head_dim", "weight_decay", "axis"}
    if bad:
        raise ValueError(
            f"Invalid overrides[{pattern!r}]: unknown keys {sorted(bad)}; allowed: kind, head_dim, weight_decay, axis"
        )
    if "axis" in spec and (spec["axis"] not in (0, 1) or spec.get("kind") not in ("row", "head")):
        raise ValueError(
            f"Invalid overrides[{pattern!r}] axis: {spec['axis']!r}; allowed: 0 or 1, with kind 'row' or 'head' "
            f"(axis 1 for weights stored [in, out] such as Conv1D)"
        )
    kind = spec.get("kind")
    if kind is not None and kind not in OVERRIDE_KINDS:
        raise ValueError(f"Invalid overrides[{pattern!r}] kind: {kind!r}; allowed: {', '.join(OVERRIDE_KINDS)}")
    if kind == "head":
        hd = spec.get("head_dim")
        if isinstance(hd, bool) or not isinstance(hd, int) or hd <= 0:
            raise ValueError(f"Invalid overrides[{pattern!r}]: kind 'head' needs a positive int head_dim, got {hd!r}")
    if "weight_decay" in spec and not isinstance(spec["weight_decay"], bool):
        raise ValueError(f"Invalid overrides[{pattern!r}] weight_decay: {spec['weight_decay']!r}; expected True or False")
    return dict(spec)


def _apply_override(pattern: str, spec: dict[str, Any], d: _Decision, shape: tuple[int, ...], pname: str) -> _Decision:
    kind = spec.get("kind")
    geom, parts = d.geometry, d.parts
    if kind is not None:
        parts = ()
        if kind == "element":
            geom = _elements(shape)
        elif kind == "tensor":
            geom = _whole(shape)
        elif kind in ("stacked_row", "stacked_column"):
            if len(shape) != 3:
                raise ValueError(f"Invalid overrides[{pattern!r}]: kind {kind!r} needs a 3-D stacked tensor "
                                 f"([E, out, in] or [E, in, out]), but {pname!r} has shape {list(shape)}")
            geom = (Geometry(-1, ((math.prod(shape), shape[2]),)) if kind == "stacked_row"
                    else Geometry(2, ((shape[0] * shape[2], 1),)))
        elif kind == "factored":
            if len(shape) != 2:
                raise ValueError(f"Invalid overrides[{pattern!r}]: kind 'factored' needs a 2-D tensor, but {pname!r} "
                                 f"has shape {list(shape)}")
            geom = factored_geometry(shape)
        elif kind in ("row", "column", "head"):
            axis = 1 if kind == "column" else spec.get("axis", 0)
            if len(shape) <= axis:
                raise ValueError(f"Invalid overrides[{pattern!r}]: kind {kind!r} needs a tensor with > {axis} dims, but {pname!r} has shape {list(shape)}")
            unit = spec["head_dim"] if kind == "head" else 1
            if shape[axis] % unit:
                raise ValueError(f"Invalid overrides[{pattern!r}]: head_dim={unit} does not divide dim {axis} of {pname!r} (shape {list(shape)})")
            geom = _rows(shape, axis, unit)
    wd = spec.get("weight_decay", d.weight_decay)
    return _Decision(geom, d.role, f"override {pattern!r}" + (f" -> {kind}" if kind else "") + (f", decay {wd}" if "weight_decay" in spec else ""), wd, parts)


def check_patterns_matched(matched: Mapping[str, int], names: list[str]) -> None:
    """``ValueError`` naming every ``overrides`` pattern that matched no parameter (``matched``:
    pattern -> number of names it full-matched), with a few names to show what they look like."""
    unmatched = [pattern for pattern, count in matched.items() if count == 0]
    if unmatched:
        raise ValueError(
            f"Invalid overrides: pattern(s) {unmatched} match no parameter name (full match; names look like "
            f"{names[:4]})"
        )


def compile_override_pattern(pattern: Any) -> re.Pattern[str]:
    """An ``overrides`` key (a regular expression, full-matched against parameter names), compiled;
    ``ValueError`` naming the key when it is not a string or not a valid expression."""
    if not isinstance(pattern, str):
        raise ValueError(f"Invalid overrides key: {pattern!r}; expected a regular-expression string")  # noqa: TRY004 - bad input is a ValueError naming the argument (house rule)
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ValueError(f"Invalid overrides pattern {pattern!r}: {e}") from None


def partition(
    model: nn.Module,
    *,
    num_heads: int | None = None,
    num_kv_heads: int | None = None,
    head_dim: int | None = None,
    overrides: Mapping[str, Any] | None = None,
    value_single_block: bool = False,
    config: Any = None,
    warn: bool = True,
    snr: Any = None,
    snr_cutoff: float = 1.0,
    state_budget: float | None = None,
    factored: bool = False,
) -> PartitionPlan:
    """Decide, from the model's structure, which block every parameter belongs to.

    Args:
        model: any ``nn.Module`` (on any device, ``meta`` included).
        num_heads, num_kv_heads, head_dim: head counts for attention modules
            that do not carry them (and no config says). They win over the
            modules' attributes and the config, and must tile the shapes.
        overrides: ``{pattern: spec}``; a pattern full-matches parameter names
            (``re.fullmatch``), later patterns win. ``spec`` is a kind
            (``"element"``, ``"tensor"``, ``"row"``, ``"column"``,
            ``"head:<head_dim>"``) or a dict with any of ``kind``, ``head_dim``,
            ``weight_decay``, ``axis`` (0, or 1 for row/head blocks of weights
            stored ``[in, out]``). A pattern that matches nothing is an error.
        value_single_block: the official release's "single lr for value"
            option (recommended by its authors for runs shorter than ~10-20k
            steps): the value projection keeps one block instead of one per
            output neuron.
        config: a model config to read head counts from when the model has
            none as ``model.config``.
        warn: emit the one warning that lists tensors no rule recognised.
        snr: decide the blocks from data instead of the structural rules: an
            :class:`~blockopt.partition.snr.SNRCalibration` measured on this
            model (each tensor gets the candidate partition with the highest
            SNR of Adam's second moment above ``snr_cutoff``, else one value per
            element), :class:`~blockopt.partition.snr.SNRRules` (decisions by
            role, e.g. from a smaller model of the family), ``"builtin"``
            (:data:`~blockopt.partition.snr.BUILTIN_SNR_RULES`), or the path (``str`` or
            ``os.PathLike``) of a calibration or rules file, read by
            :func:`~blockopt.partition.snr.load_snr` (which one it is comes from its content). The structural
            rules still find roles, heads and candidates; ``overrides`` that set
            a kind still win. See ``docs/snr.md``.
        snr_cutoff: the SNR a candidate must exceed (positive; default 1.0).
        state_budget: the largest optimizer state allowed, as a fraction of fp32
            AdamW's, in (0.5, 1]: after the rules (and ``snr``), the tensors whose
            blocks are least constant get one value per element until the budget
            is spent (:func:`~blockopt.partition.budget.apply_state_budget`).
            ``None`` (default): no budget. A budget below what the plan needs is
            an error that gives the plan's own ratio.
        factored: after the rules (and ``snr``), before the budget, give every matrix
            except embeddings a factored second moment: one value per row and one
            per column, whose product stands for each element's
            (:func:`~blockopt.partition.factored.factor_matrices`). Part of
            :class:`~blockopt.AdamMini`'s default plan.

    Returns:
        A :class:`PartitionPlan`, keyed by ``model.named_parameters()`` names.

    Example::

        >>> import blockopt
        >>> model = blockopt.models.build_model("llama-tiny", device="meta")   # any nn.Module; meta: no memory
        >>> plan = blockopt.partition(model)
        >>> plan["blocks.0.attn.q_proj.weight"].kind
        'head'
        >>> plan["blocks.0.attn.q_proj.weight"].num_blocks      # 4 heads of 32 rows
        4
        >>> print(plan)              # a table with totals  # doctest: +ELLIPSIS
        parameter ...
        38 tensors, 820,352 parameters, 4,641 second-moment values (AdamW: 820,352)
        ...
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"Invalid model: expected an nn.Module, got {type(model).__name__}")
    for n, v in (("num_heads", num_heads), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
        _check_hint(n, v)
    if num_heads is not None and num_kv_heads is not None and num_heads % num_kv_heads:
        raise ValueError(f"Invalid num_kv_heads: {num_kv_heads}; it must divide num_heads={num_heads}")
    if not isinstance(value_single_block, bool):
        raise ValueError(f"Invalid value_single_block: {value_single_block!r}; expected True or False")  # noqa: TRY004 - bad input is a ValueError naming the argument (house rule)
    check_state_budget(state_budget)
    if not isinstance(factored, bool):
        raise ValueError(f"Invalid factored: {factored!r}; expected True or False")  # noqa: TRY004 - bad input is a ValueError naming the argument (house rule)
    overrides = dict(overrides or {})
    parsed = {}
    for pattern, spec in overrides.items():
        parsed[pattern] = (compile_override_pattern(pattern), parse_override(pattern, spec))

    hints = {"num_heads": num_heads, "num_kv_heads": num_kv_heads, "head_dim": head_dim}
    engine = _Engine(model, hints, value_single_block, config)
    decisions = engine.run()

    aliases: dict[int, list[str]] = {}
    canonical: dict[int, tuple[str, torch.Tensor]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        n = canonical_name(n)
        if id(p) in canonical:
            aliases.setdefault(id(p), []).append(n)
        else:
            canonical[id(p)] = (n, p)

    if snr is not None:
        from .snr import check_cutoff

        snr_cutoff = check_cutoff(snr_cutoff)
    matched = {pattern: 0 for pattern in parsed}
    user_kind: set[str] = set()  # names whose blocks an override decided: SNR leaves them alone
    entries = []
    for pid, (n, p) in canonical.items():
        d = decisions[pid]
        all_names = [n, *aliases.get(pid, [])]
        for pattern, (regex, spec) in parsed.items():
            if any(regex.fullmatch(x) for x in all_names):
                matched[pattern] += 1
                d = _apply_override(pattern, spec, d, tuple(p.shape), n)
                if "kind" in spec:
                    engine.unknown.pop(pid, None)  # the user decided it
                    user_kind.add(n)
        entries.append(PlanEntry(n, tuple(p.shape), d.geometry, d.role, d.rule, d.weight_decay, d.parts,
                                 tuple(aliases.get(pid, ())), trainable=p.requires_grad))

    check_patterns_matched(matched, [e.name for e in entries])
    if any(v is not None for v in hints.values()) and not engine.heads_used:
        found = ("no attention module was found" if not engine.attention_modules else
                 f"{len(engine.attention_modules)} attention module(s) were found but none has a query projection "
                 "they could be applied to")
        warnings.warn(
            f"blockopt.partition: head hints were given but {found}; "
            "they were not used (name the query/key weights with overrides={pattern: 'head:<head_dim>'})",
            stacklevel=2,
        )
    plan_warnings = ()
    if engine.unknown:
        msg = _unknown_message(list(engine.unknown.values()))
        plan_warnings = (msg,)
        if warn:
            warnings.warn("blockopt.partition: " + msg, stacklevel=2)
    options = {**hints, "value_single_block": value_single_block, "overrides": {k: _json_spec(v) for k, v in overrides.items()}}
    plan = PartitionPlan(tuple(entries), options, plan_warnings)
    if snr is not None:
        from .snr import apply_snr

        plan = apply_snr(plan, snr, snr_cutoff, keep=user_kind)
    if factored:
        plan = factor_matrices(plan, keep=frozenset(user_kind))
    if state_budget is not None:
        plan = apply_state_budget(plan, state_budget, keep=frozenset(user_kind))
    return plan


def _unknown_message(items: list[str], shown: int = 6) -> str:
    """The one warning for tensors no rule recognised: repeated layers said once (``layers.*``), at
    most ``shown`` patterns, so that a large model gives a short line."""
    groups: dict[str, int] = {}
    for text in items:
        key = re.sub(r"\.\d+\.", ".*.", text)
        groups[key] = groups.get(key, 0) + 1
    listed = [f"{k} (x{n})" if n > 1 else k for k, n in list(groups.items())[:shown]]
    more = len(groups) - shown
    tail = f"; and {more} more pattern(s); print(plan) shows every entry's rule" if more > 0 else ""
    return (f"{len(items)} tensor(s) matched no structural rule and use the documented default: "
            + "; ".join(listed) + tail + ". Set their blocks with overrides={pattern: kind}")


def _json_spec(spec: Any) -> Any:
    return spec if isinstance(spec, (str, int, float, bool, type(None))) else dict(spec)


def user_kind_names(plan: PartitionPlan) -> set[str]:
    """Names whose blocks an ``overrides`` entry with a ``kind`` decided (recorded in ``plan.options``)."""
    out: set[str] = set()
    for pattern, spec in dict(plan.options.get("overrides") or {}).items():
        if "kind" not in parse_override(pattern, spec):
            continue
        regex = compile_override_pattern(pattern)
        out.update(e.name for e in plan.entries if any(regex.fullmatch(n) for n in (e.name, *e.aliases)))
    return out
