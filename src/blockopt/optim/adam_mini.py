"""AdamMini: Adam's first moment per element, one second moment per Hessian block.

In torch.optim's shape: :meth:`AdamMini.step` groups each parameter group's tensors by layout into
named step tensors and makes one call per layout: local tensors through
:mod:`blockopt.kernels.dispatch`, FSDP2 shards through :func:`blockopt.distributed.step.sharded_step`,
ZeRO partitions through :func:`blockopt.distributed.zero.zero_step`. Saving and loading:
:mod:`blockopt.optim.adam_mini_state`; in-run calibration: :mod:`blockopt.optim.calibration`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from types import MappingProxyType
from typing import Any, NamedTuple

import torch
from torch import nn

from ..distributed.dtensor import check_grad, is_dtensor, make_shard_info, reduce_partial_grads
from ..distributed.sharding import ShardInfo
from ..distributed.state import local_block_state
from ..distributed.step import sharded_step
from ..distributed.zero import FlatLayout, zero_step
from ..kernels import momentum as mom
from ..kernels.dispatch import Handle, PreparedStep, prepare_step, run_step
from ..partition import PartitionPlan, PlanEntry
from . import adam_mini_state
from .adam_mini_layouts import check_dense, check_known, hyper, joins_kernel, local_tensors, shard_tensors, zero_tensors
from .adam_mini_options import check_factored, check_factored_zero, check_options
from .adam_mini_state import block_plan
from .base import PlanOptimizer, params_and_plan, plan_options, soft_budget
from .calibration import InRunCalibration
from .compact import adopt_weights
from .compiled import warn_if_not_compiled

__all__ = ["AdamMini"]


class AdamMini(PlanOptimizer):
    r"""Adam-mini (Zhang et al., 2024): Adam with one second-moment scalar per Hessian block.

    Adam keeps two state tensors per parameter. Adam-mini keeps Adam's first
    moment but replaces the per-element second moment with one value per
    block (one attention head of the query/key, one output neuron of the
    other matrices, one token of the embeddings), so optimizer state is about
    half of AdamW's, at Adam's quality. The blocks come from a
    :class:`~blockopt.PartitionPlan` decided once, from the model's structure.
    By default (``rules="builtin"``) each tensor is cut the way the built-in
    SNR table says, every matrix but the embedding keeps a factored second
    moment (one value per row and one per column, whose product stands for each
    element's), and the tensors whose blocks are least constant keep
    per-element second moments while the state stays at or under 0.55x of
    AdamW's; ``rules="blocks"`` is the same without factoring (what FSDP2 and
    ZeRO step), ``rules="official"`` the official release's blocks, exactly.

    Update, for each parameter with a gradient ``G`` and step ``t``::

        W   <- W * (1 - lr * weight_decay)          # where the plan says decay applies
        m   <- beta1 * m + (1 - beta1) * G
        v_b <- beta2 * v_b + (1 - beta2) * mean_{i in b} G_i**2
        W_i <- W_i - lr * (m_i / (1 - beta1**t)) / (sqrt(v_b / (1 - beta2**t)) + eps)

    With every block of size one this is exactly :class:`torch.optim.AdamW`.

    Args:
        model_or_params: an ``nn.Module`` (the plan is built from it with the
            hints below), or ``model.named_parameters()``, or a list of param
            group dicts whose ``"params"`` are ``(name, tensor)`` pairs; the
            last two need ``plan=``.
        lr, betas, eps, weight_decay: as in :class:`torch.optim.AdamW`.
            Weight decay is decoupled and applies only where the plan says so
            (not to biases, norms and other 1-D tensors by default).
        num_heads, num_kv_heads, head_dim, overrides, value_single_block:
            passed to :func:`blockopt.partition` when a module is given.
        plan: an explicit :class:`~blockopt.PartitionPlan`, needed when
            named parameters are given instead of a module.
        foreach: ``True``/``None`` (default) use the vectorised step;
            ``False`` the plain reference loop.
        fused: ``None`` (default) uses the fused CPU kernel (one call per
            group, one pass per block, built once on first use) for the
            parameters it supports (fp32, contiguous, CPU; row, head, whole-tensor
            and column blocks; fp32, bf16 or int8 momentum) unless
            ``foreach=False``, torch's fused AdamW kernel for per-element
            blocks with fp32 momentum, and the foreach step for the rest;
            ``True`` requires the kernel (an error if it cannot be built);
            ``False`` never uses it. On CUDA the fused step is a Triton kernel
            (the ``[gpu]`` extra), used the same way. The step caches its
            per-group lists (state tensors, routes) while the set of parameters
            with gradients stays the same; replace state tensors through
            :meth:`load_state_dict`, not by assigning into ``optimizer.state``.
        capturable: keep step counters on the parameter's device and compute
            bias corrections there (CUDA + Triton only), so the step can be
            recorded in a CUDA graph; ``lr`` may then be a device tensor.
        maximize: maximise the objective instead of minimising it.
        momentum_dtype: storage of the first moment ``m``: ``None`` (the
            state dtype, fp32 by default), ``torch.bfloat16`` (stochastic
            rounding; state at most ~0.26x of fp32 AdamW's) or ``"int8"``
            (one fp32 scale per 256 elements of a row, square-root code,
            stochastic rounding; ~0.13x). The update itself runs in fp32; see
            :mod:`blockopt.kernels.momentum`. Checkpoints hold the compact form
            (``exp_avg`` in bf16 / int8, plus ``exp_avg_scale`` for int8).
        state_dtype: dtype of ``exp_avg`` and the block second moments. The
            default keeps fp32 state for bf16/fp16 parameters and the
            parameter's dtype otherwise.
        rules: how a module's plan is built: ``"builtin"`` (the default for a
            module: the built-in SNR table,
            :data:`~blockopt.partition.BUILTIN_SNR_RULES`, matrices factored,
            within a state budget), ``"blocks"`` (the same, blocks only) or
            ``"official"`` (the official release's structural rules, exact).
        state_budget: ``"auto"`` (default: 0.55 with the built-in rules or an
            in-budget calibration, none otherwise), ``None``, or the largest optimizer state allowed, as a fraction of
            fp32 AdamW's, in (0.5, 1]: the least constant tensors get one second
            moment per element until it is spent (see
            :func:`blockopt.partition`); applied to ``plan=`` too.
        calibrate, calibrate_points, snr_cutoff, calibrate_state: choose the
            blocks from data during the first ``calibrate`` steps (see
            :mod:`blockopt.optim.calibration`): ``calibrate_state="budget"``
            (default) stays within the state budget and measures on a sample;
            ``"adamw"`` holds AdamW's whole state during the window.
        weights: ``None`` (default: the parameters as they are) or a compact
            format, ``"bf16-sr"``, ``"bf16+int8"`` or ``"bf16+int16"`` (see
            :mod:`blockopt.kernels.weights`): the module's parameters become bf16
            and the step runs in fp32 on one tensor at a time, storing back with
            stochastic rounding or a remainder (``weight_remainder`` in the state).

    State per parameter: ``step`` (0-dim float32), ``exp_avg`` (shape of the
    parameter) and ``block_exp_avg_sq`` (1-D, one value per block). The plan
    travels in :meth:`state_dict` (``param_groups[i]["block_plan"]``) and is
    checked on :meth:`load_state_dict`.

    Distributed training: DDP works unchanged; FSDP2 (``fully_shard``, build the
    optimizer after sharding) steps the local shards with one ``all_reduce`` per step;
    DeepSpeed ZeRO 1-3 through :func:`blockopt.integrations.deepspeed.attach`;
    checkpoints load at any world size. See :mod:`blockopt.distributed`.

    Example::

        >>> import torch, blockopt
        >>> model = blockopt.models.build_model("llama-tiny")       # any nn.Module
        >>> opt = blockopt.AdamMini(model, lr=3e-4, weight_decay=0.1)
        >>> opt.plan["blocks.0.attn.o_proj.weight"].describe()      # one second moment per row and per column
        'factored 128+128'
        >>> print(opt.plan)             # what Adam-mini will do, parameter by parameter  # doctest: +ELLIPSIS
        parameter ...
        38 tensors, 820,352 parameters, 75,648 second-moment values (AdamW: 820,352)
        fp32 state: 3.4 MiB vs AdamW 6.3 MiB (0.546x)
        state budget 0.55x of AdamW's: per-element second moments for 5 tensors (65,536 parameters), first embed.weight
        ...
        >>> official = blockopt.AdamMini(model, rules="official")   # the official release's blocks, exactly
        >>> official.plan["blocks.0.attn.q_proj.weight"].describe()  # one second moment per query head
        'head x4'
        >>> tokens = torch.randint(0, 256, (2, 17))
        >>> loss = model(tokens[:, :-1], tokens[:, 1:])              # the next-token loss
        >>> loss.backward(); opt.step(); opt.zero_grad()
    """

    def __init__(
        self, model_or_params: nn.Module | Iterable[Any], lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0, *,
        num_heads: int | None = None, num_kv_heads: int | None = None, head_dim: int | None = None,
        overrides: Mapping[str, Any] | None = None, value_single_block: bool = False,
        plan: PartitionPlan | None = None, foreach: bool | None = None, fused: bool | None = None,
        capturable: bool = False, maximize: bool = False, state_dtype: torch.dtype | None = None,
        momentum_dtype: torch.dtype | str | None = None, calibrate: int | None = None,
        calibrate_points: int | None = None, snr_cutoff: float = 1.0, rules: str | None = None,
        state_budget: float | str | None = "auto", calibrate_state: str = "budget", weights: str | None = None,
    ) -> None:
        defaults = {"lr": lr, "betas": tuple(betas) if isinstance(betas, (list, tuple)) else betas, "eps": eps,
                    "weight_decay": weight_decay, "foreach": foreach, "fused": fused, "capturable": capturable,
                    "maximize": maximize}
        calib_args = check_options(defaults, state_dtype, momentum_dtype, calibrate, calibrate_points, snr_cutoff,
                                    calibrate_state)
        opts = plan_options(rules, state_budget, plan, calibrate, calibrate_state,
                            is_module=isinstance(model_or_params, nn.Module), value_single_block=value_single_block)
        self.state_dtype = state_dtype
        self.momentum_format = mom.momentum_format(momentum_dtype)
        hints = {"num_heads": num_heads, "num_kv_heads": num_kv_heads, "head_dim": head_dim, "overrides": overrides,
                 "value_single_block": value_single_block, **opts.extra}
        params, plan = params_and_plan(
            model_or_params, plan, hints, plan_required=True,
            missing_plan="Invalid plan: None. AdamMini needs to know each parameter's blocks: pass the model "
                         "(AdamMini(model)), or named parameters with plan=blockopt.partition(model)")
        # calibrate=N: N steps in the window's plan, then the SNR plan (see blockopt.optim.calibration)
        self._calib: InRunCalibration | None = None
        if calib_args is not None:
            self._calib = InRunCalibration(plan, *calib_args, state=calibrate_state, rules=opts.rules,
                                           budget=opts.budget, strict=opts.strict)
            plan = self._calib.active_plan()
        elif opts.budget is not None and not opts.strict and isinstance(model_or_params, nn.Module):
            plan = soft_budget(plan, opts.budget, "AdamMini(model)")
        self.plan = plan
        self._entries: dict[torch.Tensor, PlanEntry] = {}
        # DTensor parameters: their ShardInfo for Shard(0), None for Replicate()
        self._dtensors: dict[torch.Tensor, ShardInfo | None] = {}
        # DeepSpeed ZeRO flat partitions: their layout (see blockopt.distributed.zero)
        self._zero: dict[torch.Tensor, FlatLayout] = {}
        self._zero_group: Any = None
        # the local layout's prepared steps (see _prepared); _state_epoch invalidates them
        self._prepared_cache: dict[tuple[int, bool], _Prepared] = {}  # (id(group), compiling) -> lists
        self._backward = None  # the hooks of blockopt.step_in_backward, while they are on
        self._state_epoch = 0
        #: parameter name -> the implementation that stepped it last (see blockopt.kernels.dispatch)
        self.routes: dict[str, str] = {}
        super().__init__(params, defaults)
        self.weights = adopt_weights(self, model_or_params, weights)  # compact weights: bf16 (+ remainder)

    # --- construction and state ---------------------------------------------------------------
    def _register(self, group: dict[str, Any], names: list[str | None]) -> None:
        """Each parameter's plan entry (and shard layout for DTensors), and the group's ``block_plan``."""
        entries = {}
        dtensors: dict[torch.Tensor, ShardInfo | None] = {}
        for name, p in zip(names, group["params"]):
            entry = self.entry_for(name, p)
            entries[p] = entry
            check_factored(entry, name, dtensor=is_dtensor(p), capturable=group["capturable"])
            if is_dtensor(p):
                if group["capturable"]:
                    raise ValueError(f"Invalid capturable=True: parameter {name!r} is a DTensor (FSDP2); "
                                     "capturable steps support plain CUDA tensors only")
                dtensors[p] = make_shard_info(p, entry.geometry, name, momentum=self.momentum_format,
                                              calibrate=self._calib is not None)
        group["block_plan"] = block_plan(entries[p] for p in group["params"])
        self._entries.update(entries)
        self._dtensors.update(dtensors)

    # --- extension points (integrations, checkpoints, calibration) ---------------------------------
    @property
    def param_entries(self) -> Mapping[torch.Tensor, PlanEntry]:
        """Parameter -> its plan entry (read only)."""
        return MappingProxyType(self._entries)

    @property
    def shard_infos(self) -> Mapping[torch.Tensor, ShardInfo | None]:
        """DTensor parameter -> its :class:`~blockopt.distributed.ShardInfo` (``None`` for ``Replicate()``)."""
        return MappingProxyType(self._dtensors)

    @property
    def zero_layouts(self) -> Mapping[torch.Tensor, FlatLayout]:
        """DeepSpeed ZeRO flat partition -> its layout (empty until :meth:`attach_zero`)."""
        return MappingProxyType(self._zero)

    @property
    def calibration(self) -> InRunCalibration | None:
        """The in-run SNR calibration (``calibrate=N``): ``.phase`` (``"calibrating"`` or ``"done"``),
        ``.steps_done``, ``.meter.calibration`` (the SNRs measured so far), ``.chosen`` (the SNR plan after
        the switch; also ``self.plan``). ``None`` without ``calibrate``."""
        return self._calib

    def attach_zero(self, flats: list[tuple[int, torch.Tensor, FlatLayout]], group: Any) -> None:
        """Step DeepSpeed ZeRO's flat partitions ``(param group index, flat tensor, layout)`` from now
        on, reducing shared blocks on process ``group``: what
        :func:`blockopt.integrations.deepspeed.attach` calls."""
        check_factored_zero(self._entries.values())
        if self._calib is not None:
            raise ValueError("Invalid calibrate with DeepSpeed ZeRO: the in-run SNR calibration needs each "
                             "parameter's full second moment; calibrate first (blockopt.calibrate) and pass the plan")
        if self.momentum_format != "fp32":
            raise ValueError(f"Invalid momentum_dtype={self.momentum_format!r} with DeepSpeed ZeRO: the ZeRO "
                             "step keeps fp32 momentum")
        signatures: dict[int, list[str]] = {}
        for gi, flat, layout in flats:
            self._zero[flat] = layout
            signatures.setdefault(gi, []).append(layout.signature)
        for gi, sig in signatures.items():
            self.param_groups[gi]["zero_layout"] = " | ".join(sig)
        self._zero_group = group
        self._prepared_cache = {}

    def set_plan(self, plan: PartitionPlan, second_moments: Mapping[torch.Tensor, torch.Tensor] | None = None) -> None:
        """Swap the plan (the in-run calibration's switch): plan entries, shard layouts, group plans;
        ``second_moments``: parameter -> its full ``block_exp_avg_sq`` under ``plan`` (a sharded
        parameter keeps its rank's range)."""
        self.plan = plan
        for group in self.param_groups:
            for name, p in zip(group["param_names"], group["params"]):
                entry = plan[name]
                self._entries[p] = entry
                if p in self._dtensors:
                    self._dtensors[p] = make_shard_info(p, entry.geometry, entry.name)
            group["block_plan"] = block_plan(self._entries[p] for p in group["params"])
        for p, v in (second_moments or {}).items():
            info = self._dtensors.get(p)
            self.state[p]["block_exp_avg_sq"] = local_block_state(v, info) if info is not None else v
        self._prepared_cache = {}
        self._state_epoch += 1

    def check_saved_plan(self, saved_groups: Any, top_plan: Mapping[str, Any] | None = None) -> dict[Any, torch.Tensor]:
        """Check saved param groups (names and ``block_plan``, or a top-level plan) against this optimizer.

        Returns saved parameter id -> parameter. Raises ``ValueError`` naming the
        first parameter whose saved blocks differ from this optimizer's plan.
        """
        return adam_mini_state.check_saved_plan(self, saved_groups, top_plan)

    # --- step ---------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one optimisation step; ``closure`` re-evaluates the model and returns the loss."""
        if getattr(self, "_backward", None) is not None:  # blockopt.step_in_backward: stepped in backward
            return self._backward.on_step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._zero:
            if torch.compiler.is_compiling():
                self._init_group(self.param_groups[0])  # says (once) that this step is not traced whole
            self._zero_step()
        else:
            check_known(self)
            if self._dtensors:  # SequenceParallel's norms: Partial gradients summed over the TP ranks first
                reduce_partial_grads([p for g in self.param_groups for p in g["params"] if p.grad is not None])
            shards = shard_tensors(self) if self._dtensors else []
            self._plain_step()
            if shards:
                sharded_step(shards)
                for t in shards:
                    self.routes.update(dict.fromkeys(t.names, "sharded"))
        if self._calib is not None:
            self._calib.after_step(self)
        return loss

    def _plain_step(self) -> None:
        """The local layout: per group, one call of its prepared step (one kernel call per route). What
        depends only on which parameters have gradients (state, routes, the fused kernel's work table)
        is built once and reused while that set stays the same."""
        # every group's lists first: _init_group runs in Python even under torch.compile, and the traced
        # code must read _prepared_cache only after all of its changes
        keys = [self._init_group(group) for group in self.param_groups]
        todo = []
        for group, key in zip(self.param_groups, keys):
            prepared = self._prepared_cache.get(key)
            if prepared is None:  # no gradients
                continue
            grads = self._local_grads(prepared.params)
            for g, p in zip(grads, prepared.params):  # every gradient is checked before any state changes
                if g.layout is not torch.strided:
                    check_dense(g, p)
            todo.append((group, prepared, grads))
        for group, prepared, grads in todo:
            self._run_prepared(group, prepared, grads)

    def _run_prepared(self, group: dict[str, Any], prepared: _Prepared, grads: list[torch.Tensor]) -> None:
        """One call of a prepared step (per route); ``routes`` records the route that ran."""
        for ran, names, (handle, _) in zip(run_step(prepared.step, grads, **hyper(group, group["lr"])),
                                           prepared.names, prepared.step.handles):
            if ran != handle.route or self.routes.get(names[0]) != ran:
                self.routes.update(dict.fromkeys(names, ran))

    def _local_grads(self, params: list[torch.Tensor]) -> list[torch.Tensor]:
        if not self._dtensors:
            return [p.grad for p in params]
        return [check_grad(p, self._entries[p].name) if is_dtensor(p) else p.grad for p in params]

    @torch.compiler.disable
    def _init_group(self, group: dict[str, Any]) -> tuple[int, bool]:
        """State and prepared step (:meth:`_prepared`) of ``group``'s local tensors with gradients;
        returns their key in ``_prepared_cache`` (no entry: no gradients).

        torch.optim's name on purpose: under ``torch.compile`` Dynamo runs ``_init_group`` in Python
        instead of tracing it and guards on what it built, so the compiled step holds only the update.
        Dynamo also marks CUDA groups ``capturable``, as it does for torch's optimizers; here that would
        mean the Triton CUDA-graph step, which the user did not ask for, so it is undone."""
        cache_key = (id(group), torch.compiler.is_compiling())
        if cache_key[1]:
            if group["capturable"] and not self.defaults["capturable"]:
                group["capturable"] = False
            self._prepared_cache.pop(cache_key, None)  # Dynamo may have moved step counters: build afresh
        with_grad = [p for p in group["params"] if p.grad is not None]
        if self._dtensors:  # FSDP2 shards take the sharded layout
            with_grad = [p for p in with_grad if self._dtensors.get(p) is None]
        if not with_grad or self._zero:
            self._prepared_cache.pop(cache_key, None)
        else:
            self._prepared(group, with_grad)
        if cache_key[1]:  # what the compiled step cannot capture, said once
            warn_if_not_compiled(self, self._prepared_cache.get(cache_key))
        return cache_key

    def _prepared(self, group: dict[str, Any], with_grad: list[torch.Tensor], slot: Any = None) -> _Prepared:
        key = (tuple(map(id, with_grad)), group["foreach"], group["fused"], group["capturable"], self._state_epoch,
               len(self.state))
        slot = (id(group), torch.compiler.is_compiling()) if slot is None else slot  # step_in_backward: per tensor
        cached = self._prepared_cache.get(slot)
        if cached is not None and cached.key == key:
            return cached
        tensors, entries = local_tensors(self, group, with_grad)
        step = prepare_step(tensors, self._local_grads(with_grad), momentum=self.momentum_format, weights=self.weights,
                            join=joins_kernel(self, group), foreach=group["foreach"], fused=group["fused"],
                            capturable=group["capturable"])
        names = [[entries[i].name for i in (range(len(entries)) if index is None else index)]
                 for _, index in step.handles]
        for (handle, _), ns in zip(step.handles, names):
            self.routes.update(dict.fromkeys(ns, handle.route))
        prepared = _Prepared(key, step, names, with_grad)
        self._prepared_cache[slot] = prepared
        return prepared

    def _zero_step(self) -> None:
        """The ZeRO layout: every flat partition with a gradient, in one call of
        :func:`~blockopt.distributed.zero.zero_step` (one ``all_reduce`` for the blocks split between ranks)."""
        parts = zero_tensors(self.param_groups, self.state, self._zero)
        zero_step(parts, self._zero_group)
        for t in parts:
            self.routes.update(dict.fromkeys((pc.name for pc in t.layout.pieces), "zero"))

    # --- state dict ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """torch.optim's state dict; the plan travels with it (see :func:`blockopt.optim.adam_mini_state.state_dict`:
        ``"block_plan"`` per group, full second moments of FSDP2 parameters, gathered on every rank)."""
        return adam_mini_state.state_dict(self, super().state_dict())

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load a state saved by :meth:`state_dict` (or through ``torch.distributed.checkpoint``).

        Everything is checked before anything changes: a state saved under a
        different plan, for different parameters, or with tensors of the wrong
        size raises ``ValueError`` naming the parameter, and leaves this
        optimizer as it was. With ``calibrate=N`` the saved phase (calibrating,
        or switched to its SNR plan) and the SNRs measured so far are restored
        too. State tensors keep their saved dtype (fp32 state of bf16
        parameters stays fp32) and move to the parameter's device. For sharded
        parameters each rank keeps its range of the full second-moment vector,
        and ``exp_avg`` is resharded to the parameter's layout (or sliced, when
        it was saved by a single process).
        """
        adam_mini_state.load(self, state_dict)

    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), "plan": self.plan, "state_dtype": self.state_dtype,
                "momentum_format": self.momentum_format, "_calib": self._calib, "weights": self.weights}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        adam_mini_state.after_setstate(self, "plan" in state)


class _Prepared(NamedTuple):
    """A group's local layout, prepared: its cache key, the prepared step, each handle's tensor names."""

    key: tuple
    step: PreparedStep
    names: list[list[str]]  # per handle, its tensors' names (for opt.routes)
    params: list[torch.Tensor]  # the group's local parameters with gradients, in order

    @property
    def handles(self) -> list[tuple[Handle, list[int] | None, list[str]]]:
        return [(h, index, names) for (h, index), names in zip(self.step.handles, self.names)]
