""":class:`~blockopt.AdamMini`'s tensors grouped by layout into named step tensors (what
``torch.optim``'s ``_init_group`` does), one kind per layout:

* local tensors (plain parameters, and the local tensor of a ``Replicate()`` DTensor): one
  :class:`~blockopt.kernels.dispatch.StepTensors` per parameter group (:func:`local_tensors`),
  stepped through :mod:`blockopt.kernels.dispatch`;
* FSDP2 shards (``Shard(0)`` DTensors): one :class:`~blockopt.distributed.step.ShardTensors` per
  group (:func:`shard_tensors`), stepped by :func:`~blockopt.distributed.step.sharded_step`;
* DeepSpeed ZeRO flat partitions: one :class:`~blockopt.distributed.zero.ZeroTensors` per
  partition (:func:`zero_tensors`), stepped by :func:`~blockopt.distributed.zero.zero_step`.

State is created here on a parameter's first step, after its gradient is checked.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from ..distributed.dtensor import check_grad, is_dtensor, local_tensor, require_initialized
from ..distributed.state import as_dtensor
from ..distributed.step import ShardTensors
from ..distributed.zero import FlatLayout, ZeroTensors, zero_state
from ..kernels import momentum as mom
from ..kernels.adam_mini_triton import triton_supports
from ..kernels.blocks import is_elementwise
from ..kernels.dispatch import StepTensors
from ..partition import PlanEntry

if TYPE_CHECKING:
    from .adam_mini import AdamMini

__all__ = ["check_dense", "check_known", "hyper", "init_state", "local_tensors", "shard_tensors", "state_dtype_for",
           "zero_tensors"]


def hyper(group: Mapping[str, Any], lr: Any) -> dict[str, Any]:
    """A group's hyperparameters as the step functions take them (``lr`` as the caller reads it)."""
    beta1, beta2 = group["betas"]
    return {"lr": lr, "beta1": beta1, "beta2": beta2, "eps": group["eps"], "weight_decay": group["weight_decay"],
            "maximize": group["maximize"]}


def check_dense(g: torch.Tensor, p: torch.Tensor) -> None:
    if g.is_sparse or g.layout is not torch.strided:
        raise RuntimeError(
            "AdamMini does not support sparse gradients (got one for a parameter of shape "
            f"{list(p.shape)}); use dense gradients, e.g. nn.Embedding(sparse=False)"
        )


def state_dtype_for(opt: AdamMini, p: torch.Tensor) -> torch.dtype:
    """The dtype of ``p``'s ``exp_avg`` and second moments: ``state_dtype``, else fp32 for bf16/fp16
    parameters and the parameter's dtype otherwise."""
    if opt.state_dtype is not None:
        return opt.state_dtype
    return torch.float32 if p.dtype in (torch.float16, torch.bfloat16) else p.dtype


def init_state(opt: AdamMini, p: torch.Tensor) -> dict[str, Any]:
    """``p``'s state, created on its first step: ``step``, ``exp_avg`` (in the momentum format; a
    DTensor laid out like ``p`` for DTensors), ``block_exp_avg_sq`` (a shard: the blocks it touches)."""
    state = opt.state[p]
    if "step" not in state:  # (compact weights put their remainder in at construction)
        dtype = state_dtype_for(opt, p)
        entry = opt.param_entries[p]
        step_device = p.device if opt.defaults.get("capturable") else "cpu"
        state["step"] = torch.tensor(0.0, dtype=torch.float32, device=step_device)
        if opt.momentum_format == "fp32":
            state["exp_avg"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.contiguous_format)
        else:
            if dtype not in (torch.float32, torch.float16, torch.bfloat16):
                raise ValueError(f"Invalid momentum_dtype for parameter {entry.name!r} of dtype {p.dtype}: "
                                 "compact momentum needs fp32, bf16 or fp16 parameters")
            local = mom.new_state(opt.momentum_format, local_tensor(p))
            state.update(local if not is_dtensor(p) else {
                k: as_dtensor(v, p, mom.scale_shape(tuple(p.shape)) if k == "exp_avg_scale" else None)
                for k, v in local.items()})
        info = opt.shard_infos.get(p)
        n = info.layout.num_local_blocks if info is not None else entry.num_blocks  # a shard: its blocks
        state["block_exp_avg_sq"] = torch.zeros(n, dtype=dtype, device=local_tensor(p).device)
    return state


def check_known(opt: AdamMini) -> None:
    """Every parameter with a gradient must be one ``opt`` was built with (``ValueError``)."""
    for gi, group in enumerate(opt.param_groups):
        for p in group["params"]:
            if p.grad is not None and p not in opt.param_entries:
                raise ValueError(
                    f"Invalid parameter: a tensor of shape {list(p.shape)} in param group {gi} is not one this "
                    "optimizer was built with (no plan entry). Under DeepSpeed ZeRO, which swaps in flat "
                    "partitions, call blockopt.integrations.deepspeed.attach(engine) after deepspeed.initialize")


def local_tensors(opt: AdamMini, group: Mapping[str, Any], with_grad: list[torch.Tensor]
                  ) -> tuple[StepTensors, list[PlanEntry]]:
    """The local layout of ``group``'s parameters ``with_grad`` (their state created if new), and
    their plan entries."""
    for p in with_grad:
        check_dense(p.grad, p)
    states = [init_state(opt, p) for p in with_grad]
    entries = [opt.param_entries[p] for p in with_grad]
    tensors = StepTensors([local_tensor(p) for p in with_grad], [local_tensor(s["exp_avg"]) for s in states],
                          [s["block_exp_avg_sq"] for s in states], [s["step"] for s in states],
                          [e.geometry for e in entries], [e.weight_decay for e in entries],
                          [local_tensor(s.get("exp_avg_scale")) for s in states],
                          [mom.name_seed(e.name) for e in entries], [s.get("weight_remainder") for s in states])
    if group["capturable"] and any(p.device.type != "cuda" or not triton_supports(p, m, geo)
                                   for p, m, geo in zip(tensors.params, tensors.exp_avgs, tensors.geometries)):
        raise RuntimeError("capturable=True supports contiguous CUDA parameters with row/head/tensor/element "
                           "blocks only (see the plan); use capturable=False")
    return tensors, entries


def joins_kernel(opt: AdamMini, group: Mapping[str, Any]) -> bool:
    """Whether ``group``'s per-element tensors join the C++ kernel's launch (see
    :func:`~blockopt.kernels.dispatch.prepare_step`): where the group's plan has any other block, so
    that ``opt.step()`` and ``step_in_backward`` (one tensor at a time) take the same route."""
    entries = opt.param_entries
    return any(not is_elementwise(entries[p].geometry) for p in group["params"] if p in entries)


def shard_tensors(opt: AdamMini) -> list[ShardTensors]:
    """The FSDP2 layout: each group's ``Shard(0)`` parameters with gradients, as local shards. Every
    gradient of the optimizer is checked before any state changes."""
    for group in opt.param_groups:
        for p in group["params"]:
            if p.grad is not None:
                check_dense(p.grad, p)
    infos = opt.shard_infos
    require_initialized(f"parameter {opt.param_entries[next(iter(infos))].name!r}")
    out = []
    for group in opt.param_groups:
        lr = group["lr"]  # a capturable step never reads lr on the host (no sync: it may be in a CUDA graph)
        lr = lr.item() if isinstance(lr, torch.Tensor) and not group["capturable"] else lr
        t = ShardTensors([], [], [], [], [], [], [], [], [], hyper(group, lr), codec=mom.codec_for(opt.momentum_format))
        for p in group["params"]:
            info = infos.get(p)
            if info is None:
                continue
            if p.grad is not None:
                state, entry = init_state(opt, p), opt.param_entries[p]
                t.positions.append(len(t.every))
                for lst, x in ((t.params, p.to_local()), (t.grads, check_grad(p, entry.name)),
                               (t.exp_avgs, state["exp_avg"].to_local()), (t.steps, state["step"]),
                               (t.second_moments, state["block_exp_avg_sq"]), (t.infos, info),
                               (t.decay, entry.weight_decay), (t.dtypes, state_dtype_for(opt, p)),
                               (t.names, entry.name), (t.scales, local_tensor(state.get("exp_avg_scale"))),
                               (t.seeds, mom.name_seed(entry.name))):
                    lst.append(x)
            t.every.append(info)
        out.append(t)
    return out


def zero_tensors(param_groups: list[dict[str, Any]], state: Mapping[torch.Tensor, dict[str, Any]],
                 layouts: Mapping[torch.Tensor, FlatLayout]) -> list[ZeroTensors]:
    """The ZeRO layout: every flat partition with a gradient (its state created if new)."""
    parts = []
    for group in param_groups:
        h = hyper(group, group["lr"].item() if isinstance(group["lr"], torch.Tensor) else group["lr"])
        for p in group["params"]:
            if p.grad is None:
                continue
            s = state[p]
            if not s:
                s.update(zero_state(p, layouts[p]))
            parts.append(ZeroTensors(p, p.grad, s["exp_avg"], s["block_exp_avg_sq"], s["step"], layouts[p], h))
    return parts
