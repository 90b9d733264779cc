"""AdamMini: Adam's first moment per element, one second moment per Hessian block."""

from __future__ import annotations

import copy
import json
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

import torch
from torch import nn

from ..distributed.dtensor import check_grad, is_dtensor, local_tensor, make_shard_info, require_initialized
from ..distributed.sharding import ShardInfo
from ..distributed.state import gather_block_states, local_block_state, local_exp_avg
from ..distributed.step import partial_block_sums, reduce_shared_blocks, sharded_adam_mini_update
from ..distributed.zero import FlatLayout, flat_block_ids
from ..kernels import momentum as mom
from ..kernels.adam_mini import adam_mini_update
from ..kernels.adam_mini_triton import triton_supports
from ..kernels.blocks import Geometry, is_elementwise
from ..kernels.dispatch import Handle, StepTensors, choose_route, prepare, run, triton_enabled
from ..partition import PartitionPlan, PlanEntry, partition
from ..partition.plan import canonical_name
from .base import PlanOptimizer, check_hparams
from .calibration import InRunCalibration, check_calibrate_args, decode_state, encode_state

__all__ = ["AdamMini"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


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
        used = [k for k, v in hints.items() if v]
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
    return params, plan


class AdamMini(PlanOptimizer):
    r"""Adam-mini (Zhang et al., 2024): Adam with one second-moment scalar per Hessian block.

    Adam keeps two state tensors per parameter. Adam-mini keeps Adam's first
    moment but replaces the per-element second moment with one value per
    block (one attention head of the query/key, one output neuron of the
    other matrices, one token of the embeddings), so optimizer state is about
    half of AdamW's, at Adam's quality. The blocks come from a
    :class:`~blockopt.PartitionPlan` decided once, from the model's structure.

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

    State per parameter: ``step`` (0-dim float32), ``exp_avg`` (shape of the
    parameter) and ``block_exp_avg_sq`` (1-D, one value per block). The plan
    travels in :meth:`state_dict` (``param_groups[i]["block_plan"]``) and is
    checked on :meth:`load_state_dict`.

    Distributed training (``torchrun``; helpers in
    :mod:`blockopt.distributed.launch`):

    * **DDP** works unchanged: build the optimizer on ``ddp.module`` (or the
      model before wrapping); DDP averages gradients in backward, so every rank
      runs the ordinary step on identical full tensors and stays in sync.
    * **FSDP2** (``fully_shard``): build the optimizer *after* sharding. The
      plan is the unsharded model's (DTensor shapes are global). Parameters
      are DTensors with ``Shard(0)`` on a 1-D mesh (uneven ``torch.chunk``
      shards and empty shards included; ``Replicate()`` also works, other
      placements raise ``ValueError``). Rows inside one shard need no
      communication; blocks that cross a shard boundary (split heads,
      whole-tensor blocks, column blocks) have their partial sums added with
      **one** ``all_reduce`` per process group per step, whatever the number
      of parameters (:mod:`blockopt.distributed.step`). The step runs on the
      local shards; ``exp_avg`` is a DTensor like the parameter and each rank
      keeps the second moments of the blocks it touches. The same code runs
      on gloo and NCCL; the group comes from the parameter's device mesh.
    * **Checkpoints**: :meth:`state_dict` returns full second-moment vectors
      (collective), so ``torch.distributed.checkpoint`` with
      ``get_optimizer_state_dict`` / ``set_optimizer_state_dict`` saves at one
      world size and loads at another; see
      :mod:`blockopt.distributed.checkpoint`. A single-process ``torch.save``
      state also loads into a sharded optimizer.
    * **CPU offload**: FSDP2's ``CPUOffloadPolicy`` keeps parameters,
      gradients and this optimizer's state on the CPU and the step runs there
      (tested on gloo, with ``pin_memory=False`` on machines without CUDA);
      under NCCL the per-step reduction buffer is sent through the current
      CUDA device.

    Example::

        >>> import torch, blockopt
        >>> model = blockopt.models.build_model("llama-tiny")       # any nn.Module
        >>> opt = blockopt.AdamMini(model, lr=3e-4, weight_decay=0.1)
        >>> opt.plan["blocks.0.attn.q_proj.weight"].describe()      # one second moment per query head
        'head x4'
        >>> print(opt.plan)             # what Adam-mini will do, parameter by parameter  # doctest: +ELLIPSIS
        parameter ...
        38 tensors, 820,352 parameters, 4,641 second-moment values (AdamW: 820,352)
        fp32 state: 3.1 MiB vs AdamW 6.3 MiB (0.503x)
        ...
        >>> tokens = torch.randint(0, 256, (2, 17))
        >>> loss = model(tokens[:, :-1], tokens[:, 1:])              # the next-token loss
        >>> loss.backward(); opt.step(); opt.zero_grad()
    """

    def __init__(
        self,
        model_or_params: nn.Module | Iterable[Any],
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        num_heads: int | None = None,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        overrides: Mapping[str, Any] | None = None,
        value_single_block: bool = False,
        plan: PartitionPlan | None = None,
        foreach: bool | None = None,
        fused: bool | None = None,
        capturable: bool = False,
        maximize: bool = False,
        state_dtype: torch.dtype | None = None,
        momentum_dtype: torch.dtype | str | None = None,
        calibrate: int | None = None,
        calibrate_points: int | None = None,
        snr_cutoff: float = 1.0,
    ) -> None:
        if calibrate is not None:
            calibrate, calibrate_points, snr_cutoff = check_calibrate_args(calibrate, calibrate_points, snr_cutoff)
            if capturable:
                raise ValueError("Invalid calibrate with capturable=True: the switch to the SNR plan changes the "
                                 "state's shapes, which a recorded CUDA graph cannot follow")
        defaults = {"lr": lr, "betas": tuple(betas) if isinstance(betas, (list, tuple)) else betas,
                        "eps": eps, "weight_decay": weight_decay, "foreach": foreach, "fused": fused, "capturable": capturable,
                        "maximize": maximize}
        check_hparams(defaults)
        if state_dtype is not None and (not isinstance(state_dtype, torch.dtype) or not state_dtype.is_floating_point):
            raise ValueError(f"Invalid state_dtype: {state_dtype!r}; expected a floating torch.dtype or None")
        self.state_dtype = state_dtype
        self.momentum_format = mom.momentum_format(momentum_dtype)
        if self.momentum_format != "fp32" and capturable:
            raise ValueError(f"Invalid momentum_dtype={momentum_dtype!r} with capturable=True: the capturable "
                             "(CUDA graph) step keeps fp32 momentum")
        if self.momentum_format != "fp32" and state_dtype not in (None, torch.float32):
            raise ValueError(f"Invalid momentum_dtype={momentum_dtype!r} with state_dtype={state_dtype}: compact "
                             "momentum is decoded to fp32 for the update; use state_dtype=None or torch.float32")
        for name, flag in (("foreach", foreach), ("fused", fused), ("maximize", maximize), ("capturable", capturable)):
            if flag is not None and not isinstance(flag, bool):
                raise ValueError(f"Invalid {name}: {flag!r}; expected True, False or None")
        if fused and foreach is False:
            raise ValueError("Invalid fused=True with foreach=False: choose one implementation")
        if capturable and not triton_enabled():
            raise RuntimeError("capturable=True needs the Triton step on CUDA: pip install 'blockopt[gpu]' (and "
                               "leave BLOCKOPT_DISABLE_TRITON unset)")
        hints = {"num_heads": num_heads, "num_kv_heads": num_kv_heads, "head_dim": head_dim, "overrides": overrides,
                     "value_single_block": value_single_block}
        params, plan = params_and_plan(
            model_or_params, plan, hints, plan_required=True,
            missing_plan="Invalid plan: None. AdamMini needs to know each parameter's blocks: pass the model "
                         "(AdamMini(model)), or named parameters with plan=blockopt.partition(model)")
        # calibrate=N: per-element v for N steps, then the SNR plan (see blockopt.optim.calibration)
        self._calib: InRunCalibration | None = None
        if calibrate is not None:
            self._calib = InRunCalibration(plan, calibrate, calibrate_points, snr_cutoff)
            plan = self._calib.active_plan()
        self.plan = plan
        self._entries: dict[torch.Tensor, PlanEntry] = {}
        # DTensor parameters: their ShardInfo for Shard(0), None for Replicate()
        self._dtensors: dict[torch.Tensor, ShardInfo | None] = {}
        # DeepSpeed ZeRO-1/2 flat partitions: their layout (see blockopt.distributed.zero)
        self._zero: dict[torch.Tensor, FlatLayout] = {}
        self._zero_group: Any = None
        # the plain step's cached per-group lists (see _prepared); _state_epoch invalidates them
        self._prepared_cache: dict[int, _Prepared] = {}
        self._state_epoch = 0
        self._seeds: dict[torch.Tensor, int] = {}
        #: parameter name -> the implementation that stepped it last (see blockopt.kernels.dispatch)
        self.routes: dict[str, str] = {}
        super().__init__(params, defaults)

    # --- construction ---------------------------------------------------------
    def _register(self, group: dict[str, Any], names: list[str | None]) -> None:
        """Each parameter's plan entry (and shard layout for DTensors), and the group's ``block_plan``."""
        entries = {}
        dtensors: dict[torch.Tensor, ShardInfo | None] = {}
        for name, p in zip(names, group["params"]):
            entry = self.entry_for(name, p)
            entries[p] = entry
            if is_dtensor(p):
                if group["capturable"]:
                    raise ValueError(f"Invalid capturable=True: parameter {name!r} is a DTensor (FSDP2); "
                                     "capturable steps support plain CUDA tensors only")
                dtensors[p] = make_shard_info(p, entry.geometry, name)
        group["block_plan"] = _block_plan(entries[p] for p in group["params"])
        self._entries.update(entries)
        self._dtensors.update(dtensors)
        # stochastic-rounding seeds, computed here (zlib) rather than inside a compiled step
        self._seeds.update({p: mom.name_seed(e.name) for p, e in entries.items()})

    def _state_dtype_for(self, p: torch.Tensor) -> torch.dtype:
        if self.state_dtype is not None:
            return self.state_dtype
        return torch.float32 if p.dtype in _LOW_PRECISION else p.dtype

    def _init_state(self, p: torch.Tensor) -> dict[str, Any]:
        state = self.state[p]
        if not state:
            dtype = self._state_dtype_for(p)
            entry = self._entries[p]
            step_device = p.device if self.defaults.get("capturable") else "cpu"
            state["step"] = torch.tensor(0.0, dtype=torch.float32, device=step_device)
            if self.momentum_format == "fp32":
                state["exp_avg"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.contiguous_format)
            else:
                if dtype not in (torch.float32, torch.float16, torch.bfloat16):
                    raise ValueError(f"Invalid momentum_dtype for parameter {entry.name!r} of dtype {p.dtype}: "
                                     "compact momentum needs fp32, bf16 or fp16 parameters")
                state.update(self._compact_momentum(p, mom.new_state(self.momentum_format, local_tensor(p))))
            n = entry.num_blocks
            if self._dtensors.get(p) is not None:  # sharded: the blocks this rank touches
                n = self._dtensors[p].layout.num_local_blocks
            state["block_exp_avg_sq"] = torch.zeros(n, dtype=dtype, device=local_tensor(p).device)
        return state

    def _compact_momentum(self, p: torch.Tensor, local: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Local compact-momentum tensors, as DTensors laid out like ``p`` when ``p`` is one."""
        if not is_dtensor(p):
            return local
        from torch.distributed.tensor import DTensor

        out = {"exp_avg": DTensor.from_local(local["exp_avg"], p.device_mesh, p.placements, run_check=False,
                                             shape=p.shape, stride=p.stride())}
        if "exp_avg_scale" in local:
            shape = mom.scale_shape(tuple(p.shape))
            out["exp_avg_scale"] = DTensor.from_local(local["exp_avg_scale"], p.device_mesh, p.placements,
                                                      run_check=False, shape=shape, stride=(shape[1], 1))
        return out

    def _momentum_codec(self, ps: list[torch.Tensor]) -> _Codec | None:
        """Decode/encode around a step function that needs fp32 ``exp_avg`` (None: nothing compact)."""
        if self.momentum_format == "fp32":
            return None
        states = [self.state[p] for p in ps]
        offsets = []
        for p in ps:
            info = self._dtensors.get(p)
            offsets.append(info.layout.rows[0] * (p.numel() // max(1, p.shape[0])) if info is not None else 0)
        return _Codec(states, [self._seeds[p] for p in ps], offsets,
                      [self._state_dtype_for(p) for p in ps])

    # --- step -------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one optimisation step; ``closure`` re-evaluates the model and returns the loss."""
        loss = self._step(closure)
        if self._calib is not None:
            self._calib.after_step(self)
        return loss

    @property
    def calibration(self) -> InRunCalibration | None:
        """The in-run SNR calibration (``calibrate=N``): ``.phase`` (``"calibrating"`` or ``"done"``),
        ``.steps_done``, ``.meter.calibration`` (the SNRs measured so far), ``.chosen`` (the SNR plan after
        the switch; also ``self.plan``). ``None`` without ``calibrate``."""
        return self._calib

    def _set_plan(self, plan: PartitionPlan) -> None:
        """Swap the plan (the calibration switch): entries, shard layouts, group plans, cached step lists."""
        self.plan = plan
        for group in self.param_groups:
            for name, p in zip(group["param_names"], group["params"]):
                entry = plan[name]
                self._entries[p] = entry
                if p in self._dtensors:
                    self._dtensors[p] = make_shard_info(p, entry.geometry, entry.name)
            group["block_plan"] = _block_plan(self._entries[p] for p in group["params"])
        self._prepared_cache = {}
        self._state_epoch += 1

    def _enter_saved_phase(self, saved: Any) -> None:
        """Take the calibration phase (and its plan) of a saved ``snr_calibration`` entry, before a
        ``torch.distributed.checkpoint`` load builds its template (see :func:`blockopt.distributed.checkpoint.load`).
        Only an optimizer without state can change phase; nothing changes on error."""
        if self._calib is None:
            raise ValueError("Invalid checkpoint: it was saved by AdamMini(calibrate=...); build this optimizer "
                             "with the same calibrate, calibrate_points and snr_cutoff")
        _, chosen, _ = self._calib.check_state(decode_state(saved))
        target = chosen if chosen is not None else self._calib.calibrating_plan()
        if target.entries == self.plan.entries:
            return
        if any(self.state.get(p) for p in self._params_in_order()):
            raise ValueError(
                f"Invalid checkpoint: it was saved in calibration phase {decode_state(saved)['phase']!r}, this "
                f"optimizer is in phase {self._calib.phase!r} and holds state; load it into a freshly built optimizer")
        self._set_plan(target)

    def _step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._zero:
            self._zero_step()
            return loss
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None and p not in self._entries:
                    raise ValueError(
                        f"Invalid parameter: a tensor of shape {list(p.shape)} in param group "
                        f"{self.param_groups.index(group)} is not one this optimizer was built with (no plan "
                        "entry). Under DeepSpeed ZeRO, which swaps in flat partitions, call "
                        "blockopt.integrations.deepspeed.attach(engine) after deepspeed.initialize"
                    )
        if not self._dtensors:
            self._plain_step()
            return loss
        # check every gradient before touching any state
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    _check_dense(p.grad, p)
        if self._dtensors:
            require_initialized(f"parameter {self._entries[next(iter(self._dtensors))].name!r}")
        # Pass 1: gather each group's lists; sharded parameters (FSDP2) get their local block sums.
        # Every sharded parameter of every group is listed (in the same order on every rank, with
        # None sums where there is no gradient), so one buffer per process group holds all the
        # blocks that cross a shard boundary.
        work = []
        all_infos: list[ShardInfo] = []
        all_sums: list[torch.Tensor | None] = []
        for group in self.param_groups:
            params, grads, exp_avgs, vs, steps, geoms, decay = [], [], [], [], [], [], []
            sharded: list[list[Any]] = [[] for _ in range(8)]
            plain_owners, sharded_owners = [], []  # the parameters behind each list, for compact momentum
            for p in group["params"]:
                info = self._dtensors.get(p)
                if p.grad is None:
                    if info is not None:
                        all_infos.append(info)
                        all_sums.append(None)
                    continue
                state = self._init_state(p)
                entry = self._entries[p]
                if info is not None:
                    g = check_grad(p, entry.name)
                    m = state["exp_avg"].to_local()
                    (s,) = partial_block_sums([g], [info], [self._state_dtype_for(p)])
                    sharded_owners.append(p)
                    all_infos.append(info)
                    all_sums.append(s)
                    for lst, x in zip(sharded, (p.to_local(), g, m, state["block_exp_avg_sq"], state["step"],
                                                info, entry.weight_decay, s)):
                        lst.append(x)
                    continue
                if p in self._dtensors:  # Replicate(): every rank holds it all; plain kernels on local tensors
                    params.append(p.to_local())
                    grads.append(check_grad(p, entry.name))
                    exp_avgs.append(state["exp_avg"].to_local())
                else:
                    params.append(p)
                    grads.append(p.grad)
                    exp_avgs.append(state["exp_avg"])
                vs.append(state["block_exp_avg_sq"])
                steps.append(state["step"])
                geoms.append(entry.geometry)
                decay.append(entry.weight_decay)
                plain_owners.append(p)
            work.append((group, (params, grads, exp_avgs, vs, steps, geoms, decay), sharded,
                         self._momentum_codec(plain_owners), self._momentum_codec(sharded_owners),
                         [self._entries[p].name for p in plain_owners], [self._entries[p].name for p in sharded_owners]))
        # Pass 2: one all_reduce per process group for the boundary blocks of all sharded parameters.
        if all_infos:
            reduce_shared_blocks(all_sums, all_infos)
        # Pass 3: the updates.
        for group, lists, sharded, codec, sharded_codec, plain_names, sharded_names in work:
            beta1, beta2 = group["betas"]
            lr = group["lr"]
            # a capturable step never reads lr on the host (no sync: it may be recorded in a CUDA graph)
            host_lr = lr.item() if isinstance(lr, torch.Tensor) and not group["capturable"] else lr
            hyper = {"lr": host_lr, "beta1": beta1, "beta2": beta2,
                         "eps": group["eps"], "weight_decay": group["weight_decay"], "maximize": group["maximize"]}
            if sharded[0]:
                if sharded_codec is not None:
                    sharded[2] = sharded_codec.decode()
                sharded_adam_mini_update(*sharded, **hyper)
                self.routes.update(dict.fromkeys(sharded_names, "sharded"))
                if sharded_codec is not None:
                    sharded_codec.encode()
            if not lists[0]:
                continue
            if codec is not None:
                lists = (*lists[:2], codec.decode(), *lists[3:])
            self._generic_update(group, lists, hyper, lr, plain_names)
            if codec is not None:
                codec.encode()
        return loss

    def _generic_update(self, group: dict[str, Any], lists: tuple[list[Any], ...], hyper: dict[str, Any],
                        lr: Any, names: list[str]) -> None:
        """The unsharded parameters of the DTensor path (fp32 ``exp_avg``, local tensors): the same
        dispatcher as the plain step, without caching (per-element blocks take the C++ kernel)."""
        params, grads, exp_avgs, vs, steps, geoms, decay = lists
        if group["capturable"]:
            self._check_capturable(params, exp_avgs, geoms)
        routes = ["fused_cpu" if r == "adamw" else r
                  for r in (choose_route(p, g, m, v, geo, foreach=group["foreach"], fused=group["fused"],
                                         capturable=group["capturable"])
                            for p, g, m, v, geo in zip(params, grads, exp_avgs, vs, geoms))]
        tensors = StepTensors(list(params), list(exp_avgs), list(vs), list(steps), list(geoms), list(decay))
        for route in dict.fromkeys(routes):
            index = [i for i, r in enumerate(routes) if r == route]
            ran = run(prepare(route, tensors.subset(index)), [grads[i] for i in index],
                      **{**hyper, "lr": lr if route == "capturable" else hyper["lr"]})
            self.routes.update({names[i]: ran for i in index})

    @staticmethod
    def _check_capturable(params: list[torch.Tensor], exp_avgs: list[torch.Tensor], geoms: list[Geometry]) -> None:
        if any(p.device.type != "cuda" or not triton_supports(p, m, geo) for p, m, geo in zip(params, exp_avgs, geoms)):
            raise RuntimeError(
                "capturable=True supports contiguous CUDA parameters with row/head/tensor/element "
                "blocks only (see the plan); use capturable=False"
            )

    def _plain_step(self) -> None:
        """The step of an optimizer without DTensors: per group, cached handles and one call per route.

        What depends only on which parameters have gradients (state tensors, routes, the fused
        kernel's work table) is built once and reused while that set stays the same, so a step
        costs a scan of the gradients plus one kernel call per route.
        """
        todo = []
        for group in self.param_groups:
            params = group["params"]
            with_grad = [p for p in params if p.grad is not None]
            if not with_grad:
                continue
            prepared = self._prepared(group, with_grad)
            grads = [p.grad for p in with_grad]
            for g, p in zip(grads, with_grad):  # every gradient is checked before any state changes
                if g.layout is not torch.strided:
                    _check_dense(g, p)
            todo.append((group, prepared, grads))
        for group, prepared, grads in todo:
            beta1, beta2 = group["betas"]
            lr = group["lr"]
            hyper = {"lr": lr, "beta1": beta1, "beta2": beta2, "eps": group["eps"], "weight_decay": group["weight_decay"],
                         "maximize": group["maximize"]}
            for handle, index, names in prepared.handles:
                ran = run(handle, [grads[i] for i in index] if index is not None else grads, **hyper)
                if ran != handle.route or self.routes.get(names[0]) != ran:
                    self.routes.update(dict.fromkeys(names, ran))

    def _prepared(self, group: dict[str, Any], with_grad: list[torch.Tensor]) -> _Prepared:
        key = (tuple(map(id, with_grad)), group["foreach"], group["fused"], group["capturable"], self._state_epoch,
               len(self.state))
        cached = self._prepared_cache.get(id(group))
        if cached is not None and cached.key == key:
            return cached
        for p in with_grad:
            _check_dense(p.grad, p)
        states = [self._init_state(p) for p in with_grad]
        entries = [self._entries[p] for p in with_grad]
        if group["capturable"]:
            self._check_capturable(with_grad, [s["exp_avg"] for s in states], [e.geometry for e in entries])
        routes = [choose_route(p, p.grad, s["exp_avg"], s["block_exp_avg_sq"], e.geometry, foreach=group["foreach"],
                               fused=group["fused"], capturable=group["capturable"])
                  for p, s, e in zip(with_grad, states, entries)]
        if self.momentum_format != "fp32":  # torch's fused AdamW keeps fp32 momentum only
            routes = ["foreach" if r == "adamw" else r for r in routes]
        handles = []
        for route in dict.fromkeys(routes):
            index = [i for i, r in enumerate(routes) if r == route]
            ps = [with_grad[i] for i in index]
            ss = [states[i] for i in index]
            es = [entries[i] for i in index]
            tensors = StepTensors(ps, [s["exp_avg"] for s in ss], [s["block_exp_avg_sq"] for s in ss],
                                  [s["step"] for s in ss], [e.geometry for e in es], [e.weight_decay for e in es],
                                  [s.get("exp_avg_scale") for s in ss], [self._seeds[p] for p in ps])
            # the fused kernels store bf16 and int8 momentum themselves; the other routes go through the codec
            codec = self._momentum_codec(ps) if route in ("reference", "foreach", "triton") else None
            handle = prepare(route, tensors, codec if route != "triton" else None)
            if route == "triton":
                handle.codec = codec  # used only if the route falls back to foreach
            handles.append((handle, None if len(index) == len(with_grad) else index, [e.name for e in es]))
            self.routes.update(dict.fromkeys((e.name for e in es), route))
        prepared = _Prepared(key, handles)
        self._prepared_cache[id(group)] = prepared
        return prepared

    # --- state dict -------------------------------------------------------------
    def _param_entries(self) -> list[PlanEntry]:
        return [self._entries[p] for g in self.param_groups for p in g["params"] if p in self._entries]

    # --- DeepSpeed ZeRO-1/2 ---------------------------------------------------------
    def _zero_step(self) -> None:
        """Flat partitions (ZeRO-1/2): block sums per piece, one all_reduce for the blocks split
        between ranks, then :func:`~blockopt.kernels.adam_mini.adam_mini_update` on each piece."""
        work = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                layout = self._zero[p]
                state = self.state[p]
                dtype = torch.float32 if p.dtype in _LOW_PRECISION else p.dtype
                if not state:
                    state["step"] = torch.tensor(0.0, dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, dtype=dtype)
                    state["block_exp_avg_sq"] = torch.zeros(layout.num_v, dtype=dtype, device=p.device)
                g = p.grad.to(dtype)
                if group["maximize"]:
                    g = -g
                sums = torch.zeros(layout.num_v, dtype=dtype, device=p.device)
                ids = []
                for pc in layout.pieces:
                    i = flat_block_ids(pc.entry.shape, pc.entry.geometry, pc.start, pc.start + pc.length,
                                       p.device) - pc.blocks[0]
                    ids.append(i)
                    if not is_elementwise(pc.entry.geometry):
                        gp = g.narrow(0, pc.offset, pc.length)
                        sums.narrow(0, pc.v_offset, pc.blocks[1] - pc.blocks[0]).index_add_(0, i, gp * gp)
                work.append((group, p, layout, g, ids, sums, state))
        total = sum(layout.buffer_len for _, _, layout, *_ in work)
        if total:
            import torch.distributed as dist

            dtype = work[0][5].dtype
            buf = torch.zeros(total, dtype=dtype)
            base = 0
            for _, _, layout, _, _, sums, _ in work:
                if layout.shared_local.numel():
                    buf.index_copy_(0, layout.shared_pos + base, sums[layout.shared_local].to(dtype))
                base += layout.buffer_len
            dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=self._zero_group)
            base = 0
            for _, _, layout, _, _, sums, _ in work:
                if layout.shared_local.numel():
                    sums.index_copy_(0, layout.shared_local, buf[layout.shared_pos + base].to(sums.dtype))
                base += layout.buffer_len
        for group, p, layout, g, ids, sums, state in work:
            beta1, beta2 = group["betas"]
            lr = group["lr"].item() if isinstance(group["lr"], torch.Tensor) else group["lr"]
            views = [(pc, p.detach().narrow(0, pc.offset, pc.length), g.narrow(0, pc.offset, pc.length),
                      state["exp_avg"].narrow(0, pc.offset, pc.length),
                      state["block_exp_avg_sq"].narrow(0, pc.v_offset, pc.blocks[1] - pc.blocks[0]))
                     for pc in layout.pieces]
            stats = [None if is_elementwise(pc.entry.geometry)
                     else (sums.narrow(0, pc.v_offset, pc.blocks[1] - pc.blocks[0])
                           / layout.counts.narrow(0, pc.v_offset, pc.blocks[1] - pc.blocks[0]).to(sums.dtype))
                     for pc, *_ in views]
            steps = [state["step"].clone() for _ in views]

            def applier(block_ids: torch.Tensor):
                def apply(w: torch.Tensor, m: torch.Tensor, denom: torch.Tensor, step_size: float) -> None:
                    w.addcdiv_(m, denom[block_ids], value=-step_size)
                return apply

            adam_mini_update([v[1] for v in views], [v[2] for v in views], [v[3] for v in views],
                             [v[4] for v in views], steps, stats, [pc.entry.weight_decay for pc, *_ in views],
                             [applier(i) for i in ids], lr=lr, beta1=beta1, beta2=beta2, eps=group["eps"],
                             weight_decay=group["weight_decay"], maximize=False)
            state["step"].add_(1.0)
            self.routes.update(dict.fromkeys((pc.name for pc in layout.pieces), "zero"))

    def _attach_zero(self, flats: list[tuple[int, torch.Tensor, FlatLayout]], group: Any) -> None:
        """Take DeepSpeed's flat partitions ``(param group index, flat tensor, layout)``: see
        :func:`blockopt.integrations.deepspeed.attach`."""
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

    def _load_zero(self, state_dict: Mapping[str, Any]) -> None:
        """A state saved under the same ZeRO layout (world size, rank, partitions): checked, then loaded."""
        groups = state_dict["param_groups"]
        if len(groups) != len(self.param_groups):
            raise ValueError(f"Invalid state_dict: it has {len(groups)} parameter groups, this optimizer has "
                             f"{len(self.param_groups)}")
        id_map = {}
        for gi, (group, saved) in enumerate(zip(self.param_groups, groups)):
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
            layout = self._zero[p]
            if tuple(s["exp_avg"].shape) != tuple(p.shape) or s["block_exp_avg_sq"].numel() != layout.num_v:
                raise ValueError(f"Invalid state_dict: a ZeRO partition's state has exp_avg {list(s['exp_avg'].shape)} "
                                 f"and {s['block_exp_avg_sq'].numel()} block values; expected {list(p.shape)} and "
                                 f"{layout.num_v}")
            new_state[p] = {k: v.detach().clone().to(p.device) if k != "step" else v.detach().clone()
                            for k, v in s.items()}
        restored = self._restored_groups(groups, keep=("block_plan", "zero_layout"))
        state: Any = defaultdict(dict)
        state.update(new_state)
        torch.optim.Optimizer.__setstate__(self, {"state": state, "param_groups": restored})

    def state_dict(self) -> dict[str, Any]:
        """torch.optim's state dict; the plan travels with it.

        Each parameter group carries ``"block_plan"``: one JSON string per
        parameter (in the group's order), its plan entry. It lives in the
        groups because ``torch.distributed.checkpoint``'s
        ``get_optimizer_state_dict`` keeps only ``"state"`` and
        ``"param_groups"``; strings keep it one opaque value per group in DCP
        (a nested structure would be split into many checkpoint keys). A
        top-level ``"plan"`` (name -> entry dict) is kept too, for readers.

        For sharded (FSDP2) parameters, ``block_exp_avg_sq`` is the *full*
        vector, assembled from all ranks (a collective: call it on every rank)
        and identical everywhere, so a checkpoint written at one world size
        loads at any other; ``exp_avg`` is a DTensor laid out like the parameter.
        """
        sd = super().state_dict()
        sharded = [(i, p) for i, p in enumerate(self._params_in_order())
                   if self._dtensors.get(p) is not None and "block_exp_avg_sq" in self.state.get(p, {})]
        if sharded:
            require_initialized(f"parameter {self._entries[sharded[0][1]].name!r}")
            full = gather_block_states([self.state[p]["block_exp_avg_sq"] for _, p in sharded],
                                       [self._dtensors[p] for _, p in sharded])
            for (i, _), v in zip(sharded, full):
                sd["state"][i] = {**sd["state"][i], "block_exp_avg_sq": v}
        sd["plan"] = {e.name: e.to_dict() for e in self._param_entries()}
        if self._calib is not None and sd["param_groups"]:
            # in the groups, as block_plan is, so that it survives torch.distributed.checkpoint
            sd["param_groups"][0]["snr_calibration"] = encode_state(self._calib.to_state())
        return sd

    def _check_saved_plan(
        self, saved_groups: Any, top_plan: Mapping[str, Any] | None = None
    ) -> dict[Any, torch.Tensor]:
        """Check saved param groups (names and ``block_plan``, or a top-level plan) against this optimizer.

        Returns saved parameter id -> parameter. Raises ``ValueError`` naming the
        first parameter whose saved blocks differ from this optimizer's plan.
        """
        self._match_saved_groups({"state": {}, "param_groups": saved_groups})
        if top_plan is None and not all("block_plan" in g for g in saved_groups):
            raise ValueError(
                "Invalid state_dict: it has no plan (no 'block_plan' in its param_groups, no top-level 'plan'); "
                "it was not saved by blockopt.AdamMini"
            )
        id_map: dict[Any, torch.Tensor] = {}
        for gi, (group, saved) in enumerate(zip(self.param_groups, saved_groups)):
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
                entry = self._entries[p]
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
                    raise ValueError(
                        f"state_dict was saved with a different partition plan: parameter {name!r} was "
                        f"{old.describe()} (shape {list(old.shape)}, decay {old.weight_decay}), here "
                        f"{entry.describe()} (shape {list(entry.shape)}, decay {entry.weight_decay})"
                    )
                id_map[pid] = p
        return id_map

    def _check_saved_momentum(self, entry: PlanEntry, p: torch.Tensor, s: Mapping[str, Any]) -> None:
        """A saved first moment must be in this optimizer's storage format (checked before loading)."""
        fmt = mom.format_for(self.momentum_format, tuple(p.shape))
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

    def _params_in_order(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        if not isinstance(state_dict, Mapping) or "state" not in state_dict or "param_groups" not in state_dict:
            raise ValueError("Invalid state_dict: expected a mapping with 'state' and 'param_groups'")
        if self._zero:
            self._load_zero(state_dict)
            return
        groups = state_dict["param_groups"]
        saved = groups[0].get("snr_calibration") if groups and isinstance(groups[0], Mapping) else None
        if self._calib is None:
            if saved is not None:
                raise ValueError("Invalid state_dict: it was saved by AdamMini(calibrate=...) (in-run SNR calibration); "
                                 "build this optimizer with the same calibrate, calibrate_points and snr_cutoff")
            self._load_checked(state_dict)
            return
        if saved is None:
            raise ValueError("Invalid state_dict: this optimizer calibrates its blocks in the run (calibrate="
                             f"{self._calib.window}), but the state was saved without calibrate")
        calibration, chosen, steps = self._calib.check_state(decode_state(saved))
        before = (self.plan, dict(self._entries), dict(self._dtensors),
                  [g["block_plan"] for g in self.param_groups])
        # the saved phase's plan first, so that the checks compare against it; undone if anything fails
        self._set_plan(chosen if chosen is not None else self._calib.calibrating_plan())
        try:
            self._load_checked(state_dict)
        except BaseException:
            self.plan, self._entries, self._dtensors, block_plans = before
            for g, bp in zip(self.param_groups, block_plans):
                g["block_plan"] = bp
            self._prepared_cache = {}
            self._state_epoch += 1
            raise
        self._calib.restore(calibration, chosen, steps)

    load_state_dict.__doc__ = """Load a state saved by :meth:`state_dict` (or through ``torch.distributed.checkpoint``).

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

    def _load_checked(self, state_dict: Mapping[str, Any]) -> None:
        """Load a state saved by :meth:`state_dict` (or through ``torch.distributed.checkpoint``).

        Everything is checked before anything changes: a state saved under a
        different plan, for different parameters, or with tensors of the wrong
        size raises ``ValueError`` naming the parameter, and leaves this
        optimizer as it was. State tensors keep their saved dtype (fp32 state
        of bf16 parameters stays fp32) and move to the parameter's device.
        For sharded parameters each rank keeps its range of the full
        second-moment vector, and ``exp_avg`` is resharded to the parameter's
        layout (or sliced, when it was saved by a single process).
        """
        if not isinstance(state_dict, Mapping) or "state" not in state_dict or "param_groups" not in state_dict:
            raise ValueError("Invalid state_dict: expected a mapping with 'state' and 'param_groups'")
        saved_groups = state_dict["param_groups"]
        id_map = self._check_saved_plan(saved_groups, state_dict.get("plan"))
        new_state: dict[torch.Tensor, dict[str, Any]] = {}
        for pid, s in state_dict["state"].items():
            if pid not in id_map:
                raise ValueError(f"Invalid state_dict: state for unknown parameter index {pid!r}")
            p = id_map[pid]
            entry = self._entries[p]
            missing = {"step", "exp_avg", "block_exp_avg_sq"} - set(s)
            if missing:
                raise ValueError(f"Invalid state_dict: state of {entry.name!r} lacks {sorted(missing)}")
            self._check_saved_momentum(entry, p, s)
            if tuple(s["exp_avg"].shape) != tuple(p.shape) or s["block_exp_avg_sq"].numel() != entry.num_blocks:
                raise ValueError(
                    f"Invalid state_dict: state of {entry.name!r} has exp_avg {list(s['exp_avg'].shape)} and "
                    f"{s['block_exp_avg_sq'].numel()} block values; expected {list(p.shape)} and {entry.num_blocks}"
                )
            new_state[p] = {
                k: (v.detach().clone().to(p.device) if isinstance(v, torch.Tensor) and k != "step"
                    else v.detach().clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v))
                for k, v in s.items()
                if not (p in self._dtensors and k in ("exp_avg", "block_exp_avg_sq", "exp_avg_scale"))
            }
            if p in self._dtensors:
                info = self._dtensors[p]
                new_state[p]["exp_avg"] = local_exp_avg(s["exp_avg"], p)
                if "exp_avg_scale" in s:
                    new_state[p]["exp_avg_scale"] = local_exp_avg(s["exp_avg_scale"], p,
                                                                  mom.scale_shape(tuple(p.shape)))
                full = s["block_exp_avg_sq"]
                v = local_block_state(full, info) if info is not None else full.detach().clone()
                new_state[p]["block_exp_avg_sq"] = v.to(local_tensor(p).device)
        groups = self._restored_groups(saved_groups, keep=("block_plan",))
        state: Any = defaultdict(dict)
        state.update(new_state)
        self.__setstate__({"state": state, "param_groups": groups})

    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), "plan": self.plan, "state_dtype": self.state_dtype,
                "momentum_format": self.momentum_format, "_calib": self._calib}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for name, default in (("routes", {}), ("_zero", {}), ("_zero_group", None)):
            if not hasattr(self, name):  # a copy or a pickle: what is rebuilt, or starts empty
                setattr(self, name, default)
        self._prepared_cache = {}
        self._state_epoch = getattr(self, "_state_epoch", 0) + 1
        if not hasattr(self, "momentum_format"):  # pickled before compact momentum existed
            self.momentum_format = "fp32"
        if not hasattr(self, "_calib"):  # pickled before in-run calibration existed
            self._calib = None
        for group in self.param_groups:
            group.setdefault("foreach", None)
            group.setdefault("fused", None)
            group.setdefault("capturable", False)
            group.setdefault("maximize", False)
        # after copy/pickle: rebuild the parameter -> plan entry map and the shard infos
        if "plan" in state:
            self._entries = {
                p: self.plan[n] for g in self.param_groups for n, p in zip(g["param_names"], g["params"])
            }
            self._dtensors = {p: make_shard_info(p, e.geometry, e.name) for p, e in self._entries.items()
                              if is_dtensor(p)}
        if hasattr(self, "_entries"):
            self._seeds = {p: mom.name_seed(e.name) for p, e in self._entries.items()}
        for group in self.param_groups:
            if "block_plan" not in group:
                group["block_plan"] = _block_plan(self._entries[p] for p in group["params"])


class _Codec:
    """Compact first moments around a step function that works on fp32 ``exp_avg`` tensors.

    :meth:`decode` returns fp32 (or the state dtype) copies; after the step,
    :meth:`encode` stores them back with the seed of the step just taken, as
    the fused CPU kernel does inline.
    """

    def __init__(self, states: list[dict[str, Any]], seeds: list[int], offsets: list[int],
                 dtypes: list[torch.dtype]) -> None:
        self.states, self.seeds, self.offsets, self.dtypes = states, seeds, offsets, dtypes
        self.values: list[torch.Tensor] = []

    def decode(self) -> list[torch.Tensor]:
        self.values = []
        for s, dtype in zip(self.states, self.dtypes):
            scale = s.get("exp_avg_scale")
            v = mom.decode(local_tensor(s["exp_avg"]), None if scale is None else local_tensor(scale))
            self.values.append(v.to(dtype) if v.dtype != dtype else v)
        return self.values

    def encode(self) -> None:
        for s, v, seed, off in zip(self.states, self.values, self.seeds, self.offsets):
            scale = s.get("exp_avg_scale")
            mom.encode_(local_tensor(s["exp_avg"]), v.float(), mom.step_seed(seed, int(s["step"].item())),
                        None if scale is None else local_tensor(scale), off)
        self.values = []


class _Prepared(NamedTuple):
    key: tuple
    handles: list[tuple[Handle, list[int] | None, list[str]]]  # handle, its tensors' indices, their names


def _check_dense(g: torch.Tensor, p: torch.Tensor) -> None:
    if g.is_sparse or g.layout is not torch.strided:
        raise RuntimeError(
            "AdamMini does not support sparse gradients (got one for a parameter of shape "
            f"{list(p.shape)}); use dense gradients, e.g. nn.Embedding(sparse=False)"
        )


def _block_plan(entries: Iterable[PlanEntry]) -> list[str]:
    """A group's ``"block_plan"``: each parameter's plan entry as compact JSON, in the group's order."""
    return [json.dumps(e.to_dict(), sort_keys=True, separators=(",", ":")) for e in entries]
