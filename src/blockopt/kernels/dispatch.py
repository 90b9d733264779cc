"""One entry for the Adam-mini step: which implementation steps each tensor, and the call.

Five implementations share one contract (the tensor lists of
:func:`~blockopt.kernels.adam_mini.adam_mini_reference`) and the names below:

=============  ==============================================================
``reference``  the plain loop (``foreach=False``), the ground truth
``foreach``    multi-tensor ops: :func:`~blockopt.kernels.adam_mini.adam_mini_foreach`
``adamw``      per-element blocks with fp32 state on CPU: torch's fused AdamW (where no
               tensor of the same step takes the C++ kernel; otherwise they join its launch)
``fused_cpu``  the C++ kernel (:mod:`blockopt.kernels.adam_mini_cpu`)
``triton``     the Triton kernel on CUDA (``capturable`` for CUDA graphs)
=============  ==============================================================

:func:`choose_route` decides per tensor, from the tensors, the options and the
momentum storage format, and its answer is final: a :class:`Route`, the
implementation and the one codec of that format (:mod:`blockopt.kernels.momentum`)
that the route runs around, if any. :func:`prepare` builds a typed handle (its
cached tables) per route; :func:`run` steps a handle. :func:`prepare_step` and
:func:`run_step` do this for a list of tensors, and :func:`adam_mini`, the
functional form in the shape of ``torch.optim.adam.adam``, is the two in one
call; it returns the route of every tensor. :class:`~blockopt.AdamMini` keeps
the prepared step of each parameter group between steps and reports the
routes as ``opt.routes``.

The Triton route is safe to try: on the first step of each kind of tensor it
compiles and launches its kernels on scratch tensors, and if that fails it
warns once (naming the error and ``BLOCKOPT_DISABLE_TRITON=1``) and those
tensors take the foreach route, with nothing changed before the fallback.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch.optim.adamw import adamw as torch_adamw  # torch's functional AdamW (public)

from . import momentum as mom
from . import weights as cw
from .adam_mini import adam_mini_foreach, adam_mini_reference
from .adam_mini_cpu import fused_cpu_step, fused_cpu_supports, fused_cpu_tables, load_cpu_kernel
from .adam_mini_triton import adam_mini_triton, triton_available, triton_supports
from .blocks import Geometry, is_elementwise

__all__ = ["ROUTES", "Handle", "PreparedStep", "Route", "StepTensors", "adam_mini", "choose_route", "prepare",
           "prepare_step", "run", "run_step", "triton_enabled"]

#: the implementations, by the names :func:`choose_route` returns and ``opt.routes`` reports
ROUTES = ("reference", "foreach", "adamw", "fused_cpu", "triton", "capturable")


@dataclass
class StepTensors:
    """The lists a step reads and writes (one entry per tensor); see the contract in
    :mod:`blockopt.kernels.adam_mini`. ``scales`` (int8 momentum) and ``seeds`` (stochastic rounding
    of bf16/int8 momentum) are needed only for compact momentum."""

    params: list[torch.Tensor]
    exp_avgs: list[torch.Tensor]
    second_moments: list[torch.Tensor]
    steps: list[torch.Tensor]
    geometries: list[Geometry]
    decay: list[bool]
    scales: list[torch.Tensor | None] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    remainders: list[torch.Tensor | None] = field(default_factory=list)

    def subset(self, index: Sequence[int]) -> StepTensors:
        pick = lambda lst: [lst[i] for i in index] if lst else []
        return StepTensors(pick(self.params), pick(self.exp_avgs), pick(self.second_moments), pick(self.steps),
                           pick(self.geometries), pick(self.decay), pick(self.scales), pick(self.seeds),
                           pick(self.remainders))


@dataclass
class Handle:
    """A route's prepared step: its tensors and whatever it caches between steps.

    ``tables``: the C++ kernel's work table and per-tensor maps (``fused_cpu``); the per-decay
    classes of torch's fused AdamW (``adamw``). ``codec``: the route's momentum codec
    (:class:`Route`), for the routes that compute on fp32 ``exp_avg``."""

    route: str
    tensors: StepTensors
    tables: Any = None
    codec: mom.Codec | None = None
    weights: str | None = None  # compact weights (kernels/weights.py): the route steps a widened copy


_HYPER = ("lr", "beta1", "beta2", "eps", "weight_decay", "maximize")


def triton_enabled() -> bool:
    """Triton is installed, not switched off (``BLOCKOPT_DISABLE_TRITON=1``), and not found broken."""
    return (triton_available() and os.environ.get("BLOCKOPT_DISABLE_TRITON", "") in ("", "0")
            and _triton_state["error"] is None)


class Route(NamedTuple):
    """What :func:`choose_route` decides for a tensor: the implementation, and the momentum codec it
    runs around (``reference``, ``foreach``) or falls back to (``triton``); ``None`` for fp32
    momentum and for the kernels that store compact momentum themselves (``fused_cpu``, ``triton``)."""

    name: str
    codec: mom.Codec | None = None


#: the routes that compute on fp32 ``exp_avg`` (Triton only when it falls back to foreach)
_CODEC_ROUTES = ("reference", "foreach", "triton")


def choose_route(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, geometry: Geometry, *,
                 momentum: str = "fp32", foreach: bool | None = None, fused: bool | None = None,
                 capturable: bool = False, wide: bool = False) -> Route:
    """The implementation for one tensor and its codec (``foreach``/``fused``/``capturable`` as in
    ``torch.optim``; ``momentum``: the storage format of ``m``, see :mod:`blockopt.kernels.momentum`).
    Final: callers run what it returns.

    Under ``torch.compile`` CUDA tensors take ``foreach`` (Inductor generates its kernels; the Triton
    launches are not traced), which keeps step counters and ``lr`` as tensors, as capturable does;
    per-element blocks on the CPU take the C++ kernel (a custom op), as torch's fused AdamW is not traced.
    ``wide``: the route steps fp32 copies of ``p`` and ``g`` (compact weights), whatever their dtype."""
    name = _route_name(p, g, m, v, geometry, momentum, foreach, fused, capturable, wide)
    return Route(name, mom.codec_for(momentum) if name in _CODEC_ROUTES else None)


def _route_name(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, geometry: Geometry,
                momentum: str, foreach: bool | None, fused: bool | None, capturable: bool, wide: bool = False) -> str:
    compiling = torch.compiler.is_compiling()
    if foreach is False:
        return "reference"
    if capturable and not compiling:
        return "capturable"
    if fused is False or v.dtype not in (torch.float32, torch.float64):
        # a bf16/fp16 second moment (state_dtype): the arithmetic runs in that dtype, which only the
        # reference and foreach steps do (the fused kernels compute in fp32)
        return "foreach"
    if p.device.type == "cpu":
        if (wide or g.dtype == torch.float32) and fused_cpu_supports(p, m, geometry, wide=wide):
            # torch's fused AdamW keeps fp32 momentum only
            if is_elementwise(geometry) and momentum == "fp32" and m.dtype == torch.float32 and not (compiling or wide):
                return "adamw"
            if load_cpu_kernel() is not None:
                return "fused_cpu"
    elif p.device.type == "cuda" and not compiling and triton_enabled() and triton_supports(p, m, geometry):
        return "triton"
    return "foreach"


def prepare(route: str, tensors: StepTensors, codec: mom.Codec | None = None) -> Handle:
    """The handle of ``route`` for these tensors (tables built once, reused while they stay the same)."""
    if route == "fused_cpu":
        tables = fused_cpu_tables([tuple(p.shape) for p in tensors.params], tensors.geometries, tensors.decay,
                                  tensors.exp_avgs, tensors.scales or None, tensors.seeds or None)
        return Handle(route, tensors, tables)
    if route == "adamw":
        classes = []
        for decayed in (True, False):
            sub = [i for i, on in enumerate(tensors.decay) if on == decayed]
            if sub:
                t = tensors.subset(sub)
                classes.append((decayed, sub, t.params, t.exp_avgs,
                                [v.view(p.shape) for v, p in zip(t.second_moments, t.params)], t.steps))
        return Handle(route, tensors, tuple(classes))
    if route in _CODEC_ROUTES:
        return Handle(route, tensors, codec=codec)
    if route == "capturable":
        return Handle(route, tensors)
    raise ValueError(f"Invalid route: {route!r}; allowed: {', '.join(ROUTES)}")


def run(handle: Handle, grads: Sequence[torch.Tensor], *, lr: Any, beta1: float, beta2: float, eps: float,
        weight_decay: float, maximize: bool) -> str:
    """One step of ``handle``'s tensors with these gradients; returns the route that ran (``foreach``
    when the Triton route fell back)."""
    hyper = {"lr": lr, "beta1": beta1, "beta2": beta2, "eps": eps, "weight_decay": weight_decay, "maximize": maximize}
    if handle.weights is not None:
        return _run_wide(handle, grads, hyper)
    t = handle.tensors
    route = handle.route
    if route == "fused_cpu":
        fused_cpu_step(handle.tables, t.params, grads, t.exp_avgs, t.second_moments, t.steps, **_host(hyper))
        return route
    if route == "adamw":  # per-element blocks are AdamW: torch's own fused kernel, per decay class
        h = _host(hyper)
        for decayed, sub, params, exp_avgs, vs, steps in handle.tables:
            torch_adamw(params, [grads[i] for i in sub], exp_avgs, vs, [], steps, fused=True,
                                    amsgrad=False, lr=h["lr"], beta1=beta1, beta2=beta2,
                                    weight_decay=weight_decay if decayed else 0.0, eps=eps, maximize=maximize)
        return route
    if route == "capturable":
        adam_mini_triton(t.params, grads, t.exp_avgs, t.second_moments, t.steps, t.geometries, t.decay,
                         **hyper, capturable=True)
        return route
    if route == "triton":
        h = _host(hyper)
        if _triton_probe(t, h):
            adam_mini_triton(t.params, grads, t.exp_avgs, t.second_moments, t.steps, t.geometries, t.decay, **h,
                             seeds=t.seeds or None, scales=t.scales or None)
            return route
        route = "foreach"  # the kernels failed on scratch tensors: nothing of these tensors has changed
    codec = handle.codec
    exp_avgs = codec.decode(t.exp_avgs, t.scales) if codec is not None else t.exp_avgs
    step = adam_mini_reference if route == "reference" else adam_mini_foreach
    step(t.params, grads, exp_avgs, t.second_moments, t.steps, t.geometries, t.decay, **_host(hyper))
    if codec is not None:
        codec.encode(t.exp_avgs, exp_avgs, t.steps, t.scales, t.seeds)
    return route


#: compact weights: the largest run of rows widened at once (elements), where the blocks allow
WIDE_CHUNK = 1 << 22


def _run_wide(handle: Handle, grads: Sequence[torch.Tensor], hyper: dict[str, Any]) -> str:
    """Compact weights: each tensor widened to fp32 (with its remainder), stepped by the route, and
    stored back (:mod:`blockopt.kernels.weights`); one tensor at a time, and a large tensor whose
    blocks are runs within its rows (per-element, per-row) in runs of rows of at most
    :data:`WIDE_CHUNK` elements, so the fp32 copies (weights, gradient, decoded momentum) stay small."""
    t = handle.tensors
    ran = handle.route
    for i, (p, g) in enumerate(zip(t.params, grads, strict=True)):
        rem = t.remainders[i] if t.remainders else None
        seed = t.seeds[i] if t.seeds else 0
        runs = _row_runs(p, t.geometries[i])
        whole = runs is None
        if whole:
            runs = [(0, None, 0, None, t.geometries[i])]
        step = t.steps[i]
        for r0, r1, v0, v1, geo in runs:  # each run steps a copy of the counter; the tensor's counter moves once
            cut = (lambda x: x) if whole else (lambda x: None if x is None else x[r0:r1])  # noqa: B023
            part = StepTensors([cw.widen(cut(p), cut(rem))], [cut(t.exp_avgs[i])], [t.second_moments[i][v0:v1]],
                               [step.clone()], [geo], [t.decay[i]], [cut(t.scales[i]) if t.scales else None],
                               [(seed + r0 * 0x9E3779B9) & 0xFFFFFFFF])
            h = (Handle("fused_cpu", part, handle.tables) if whole and handle.route == "fused_cpu" and len(t.params) == 1
                 else prepare(handle.route, part, handle.codec))
            gr = cut(g)
            ran = run(h, [gr if gr.dtype == torch.float32 else gr.float()], **hyper)
            cw.narrow_(cut(p), cut(rem), part.params[0], seed, int(part.steps[0].item()),
                       offset=r0 * (p.numel() // max(p.shape[0], 1)) if p.dim() else 0)
        step.copy_(part.steps[0])
    return ran


def _row_runs(p: torch.Tensor, geometry: Geometry) -> list[tuple[int, int, int, int, Geometry]] | None:
    """Runs of whole rows of at most :data:`WIDE_CHUNK` elements, for a large tensor whose blocks lie
    within runs of rows (consecutive elements within a row, or whole rows): ``(first row, end row,
    first v, end v, the run's geometry)``; ``None``: the whole tensor at once."""
    if p.dim() < 2 or p.numel() <= WIDE_CHUNK or geometry.axis not in (-1, 0) or len(geometry.segments) != 1:
        return None
    rows, cols, unit = p.shape[0], p.numel() // p.shape[0], geometry.segments[0][1]
    if geometry.axis == -1:  # blocks of `unit` consecutive elements
        if cols % unit:
            return None
        n = max(1, WIDE_CHUNK // cols)
        return [(r, min(r + n, rows), r * cols // unit, min(r + n, rows) * cols // unit,
                 Geometry(-1, (((min(r + n, rows) - r) * cols, unit),))) for r in range(0, rows, n)]
    n = max(unit, WIDE_CHUNK // cols // unit * unit)  # blocks of `unit` whole rows
    return [(r, min(r + n, rows), r // unit, min(r + n, rows) // unit, Geometry(0, ((min(r + n, rows) - r, unit),)))
            for r in range(0, rows, n)]


@dataclass
class PreparedStep:
    """Tensors split by :func:`choose_route`, each part's handle built: what :func:`adam_mini` does
    on every call, and what :class:`~blockopt.AdamMini` keeps between steps while the same tensors
    have gradients. ``handles``: each handle with its tensors' positions (``None``: all of them)."""

    handles: list[tuple[Handle, list[int] | None]]


def prepare_step(tensors: StepTensors, grads: Sequence[torch.Tensor], *, momentum: str | None = None,
                 foreach: bool | None = None, fused: bool | None = None, capturable: bool = False,
                 route: str | None = None, join: bool | None = None, weights: str | None = None) -> PreparedStep:
    """The routes of ``tensors`` (``route`` for all, or :func:`choose_route` per tensor) and their
    handles. ``momentum``: the storage format of every ``exp_avg`` (``None``: read from its dtype).
    ``join``: whether the tensors that :func:`choose_route` gives torch's fused AdamW (``adamw``) join
    the C++ kernel's launch instead; ``None``: where another of ``tensors`` takes the kernel (an
    optimizer decides per parameter group, so that a tensor stepped alone takes its group's route).
    ``weights``: the compact weight format of ``tensors.params`` (:mod:`blockopt.kernels.weights`):
    each tensor gets its own handle, stepped on an fp32 copy (the route chosen for fp32)."""
    if route is not None and route not in ROUTES:
        raise ValueError(f"Invalid route: {route!r}; allowed: {', '.join(ROUTES)}")
    formats = [momentum or mom.stored_format(m) for m in tensors.exp_avgs]
    if route is not None:
        routes = [Route(route, mom.codec_for(f) if route in _CODEC_ROUTES else None) for f in formats]
    else:
        routes = [choose_route(p, g, m, v, geo, momentum=f, foreach=foreach, fused=fused, capturable=capturable,
                               wide=weights is not None)
                  for p, g, m, v, geo, f in zip(tensors.params, grads, tensors.exp_avgs, tensors.second_moments,
                                                tensors.geometries, formats)]
        if join is None:
            join = any(r.name == "fused_cpu" for r in routes)
        if join and any(r.name == "adamw" for r in routes) and load_cpu_kernel() is not None:
            # one launch: the per-element tensors join the C++ kernel (AdamW within fp32 rounding; torch's
            # fused AdamW, bit for bit, steps them where nothing else takes the kernel)
            routes = [Route("fused_cpu") if r.name == "adamw" else r for r in routes]
    handles = []
    if weights is not None:  # one handle per tensor: the fp32 copies exist one at a time
        for i, r in enumerate(routes):
            h = prepare(r.name, tensors.subset([i]), r.codec)
            h.weights = weights
            handles.append((h, [i]))
        return PreparedStep(handles)
    for r in dict.fromkeys(routes):
        index = [i for i, x in enumerate(routes) if x == r]
        whole = len(index) == len(routes)
        handles.append((prepare(r.name, tensors if whole else tensors.subset(index), r.codec),
                        None if whole else index))
    return PreparedStep(handles)


def run_step(prepared: PreparedStep, grads: Sequence[torch.Tensor], *, lr: Any, beta1: float, beta2: float,
             eps: float, weight_decay: float, maximize: bool) -> list[str]:
    """One step of every handle of ``prepared`` (:func:`run`); the route that ran, per handle."""
    return [run(handle, grads if index is None else [grads[i] for i in index], lr=lr, beta1=beta1, beta2=beta2,
                eps=eps, weight_decay=weight_decay, maximize=maximize)
            for handle, index in prepared.handles]


def adam_mini(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    block_exp_avg_sqs: Sequence[torch.Tensor],
    state_steps: Sequence[torch.Tensor],
    geometries: Sequence[Geometry],
    decay: Sequence[bool],
    *,
    foreach: bool | None = None,
    fused: bool | None = None,
    capturable: bool = False,
    lr: Any,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    maximize: bool = False,
    exp_avg_scales: Sequence[torch.Tensor | None] | None = None,
    seeds: Sequence[int] | None = None,
    route: str | None = None,
) -> list[str]:
    """Functional Adam-mini: one step of every tensor, each through the implementation
    :func:`choose_route` picks (or ``route`` for all); returns the route that stepped each tensor.

    ``exp_avgs`` may be compact (bf16, or int8 with ``exp_avg_scales``); ``seeds`` are the
    tensors' base seeds for stochastic rounding (:func:`blockopt.kernels.momentum.name_seed`).
    """
    n = len(params)
    tensors = StepTensors(list(params), list(exp_avgs), list(block_exp_avg_sqs), list(state_steps), list(geometries),
                          list(decay), list(exp_avg_scales or [None] * n), list(seeds or [0] * n))
    prepared = prepare_step(tensors, grads, foreach=foreach, fused=fused, capturable=capturable, route=route)
    ran = run_step(prepared, grads, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
                   maximize=maximize)
    out = [""] * n
    for (_, index), got in zip(prepared.handles, ran):
        for i in range(n) if index is None else index:
            out[i] = got
    return out


def _host(hyper: dict[str, Any]) -> dict[str, Any]:
    lr = hyper["lr"]
    if torch.compiler.is_compiling():
        # the compiled routes take lr as a tensor: a tensor lr stays one (no .item(): no graph break, no
        # recompile when a scheduler changes it), a float becomes one by a multiplication, the form in
        # which a symbolic float stays an input (once Dynamo has seen it change) instead of being
        # specialized again at every value
        return {**hyper, "lr": lr if isinstance(lr, torch.Tensor) else torch.ones((), dtype=torch.float64) * lr}
    return {**hyper, "lr": lr.item() if isinstance(lr, torch.Tensor) else lr}


# --- the Triton route's first use -------------------------------------------------------------------
_triton_state: dict[str, Any] = {"error": None, "probed": set()}


def _probe_key(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, geometry: Geometry) -> tuple:
    unit = geometry.segments[0][1] * (1 if geometry.axis == -1 else p.numel() // max(1, p.shape[0]))
    return (p.device, p.dtype, m.dtype, is_elementwise(geometry), 1 << max(0, (min(unit, 1024) - 1).bit_length()))


def _triton_probe(t: StepTensors, hyper: dict[str, Any]) -> bool:
    """Compile and launch the kernels these tensors need, on scratch tensors, once per kind; False
    (after one warning) when that fails, so the caller falls back before touching any real tensor."""
    if _triton_state["error"] is not None:
        return False
    keys = {_probe_key(p, p, m, geo): (p, m) for p, m, geo in zip(t.params, t.exp_avgs, t.geometries)}
    todo = [k for k in keys if k not in _triton_state["probed"]]
    if not todo:
        return True
    try:
        for key in todo:
            device, p_dtype, m_dtype, elementwise, tile = key
            shape = (1, tile) if not elementwise else (4,)
            geo = Geometry(-1, ((4, 1),)) if elementwise else Geometry(0, ((1, 1),))
            p = torch.zeros(shape, dtype=p_dtype, device=device)
            m = torch.zeros(shape, dtype=m_dtype, device=device)
            scale = torch.zeros(mom.scale_shape(shape), device=device) if m_dtype == torch.int8 else None
            v = torch.zeros(geo.num_blocks, device=device)
            adam_mini_triton([p], [torch.zeros_like(p)], [m], [v], [torch.zeros((), device="cpu")], [geo], [True],
                             **hyper, seeds=[0], scales=[scale])
            _triton_state["probed"].add(key)
    except Exception as e:  # noqa: BLE001 - any compile or launch failure means: do not use the route
        _triton_state["error"] = f"{type(e).__name__}: {e}"
        warnings.warn(
            f"blockopt: the Triton step failed to compile or launch ({_triton_state['error'].splitlines()[0]}); "
            "these tensors take the foreach route from now on (set BLOCKOPT_DISABLE_TRITON=1 to skip Triton)",
            RuntimeWarning, stacklevel=3)
        return False
    return True
