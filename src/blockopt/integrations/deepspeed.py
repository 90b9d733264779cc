"""DeepSpeed ZeRO with :class:`~blockopt.AdamMini` as the client optimizer.

    model = ...
    opt = blockopt.AdamMini(model, lr=1e-3, weight_decay=0.1, rules="blocks")  # the plan of the whole model
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config)
    blockopt.integrations.deepspeed.attach(engine)                   # map the plan onto ZeRO's partitions

ZeRO stages 1 and 2 hand the client optimizer one flat fp32 partition per parameter group;
:func:`attach` reads where each parameter sits in it (DeepSpeed's ``round_robin_bit16_groups``,
``round_robin_bit16_offsets``, ``partition_size`` and ``real_dp_process_group`` of the ZeRO
optimizer, tested with DeepSpeed 0.19.8) and gives AdamMini the layout
(:mod:`blockopt.distributed.zero`). Under stage 3 every parameter is split on its own; the layout
comes from ``fp16_groups``, ``fp32_partitioned_groups_flat``, ``sub_group_to_group_id`` and each
parameter's ``ds_tensor.ds_numel``. Optimizer offload is refused with a clear error.
The config needs ``"zero_allow_untested_optimizer": true``. Checkpoints go through
``engine.save_checkpoint`` / ``load_checkpoint`` and load at the world size they were saved at.
"""

from __future__ import annotations

from typing import Any

from ..distributed.zero import flat_layout, flat_layout_stage3
from ..optim.adam_mini import AdamMini

__all__ = ["attach"]


def _zero_optimizer(obj: Any) -> Any:
    """The ZeRO optimizer inside ``obj``: an engine, accelerate's or DeepSpeed's wrappers, or itself."""
    for _ in range(6):
        if obj is None or hasattr(obj, "round_robin_bit16_groups") or type(obj).__name__.endswith("Stage3"):
            return obj
        obj = getattr(obj, "optimizer", None)
    return obj


def attach(engine: Any) -> AdamMini:
    """Map the client AdamMini's plan onto the ZeRO (stage 1, 2 or 3) flat partitions of ``engine`` (a
    ``DeepSpeedEngine``, its ZeRO optimizer, or a wrapper of it such as accelerate's); returns it."""
    import torch.distributed as dist

    zero = _zero_optimizer(engine)
    client = getattr(zero, "optimizer", None)
    if zero is not None and type(zero).__name__.endswith("Stage3") and isinstance(client, AdamMini):
        return _attach_stage3(zero, client)
    if zero is None or not isinstance(client, AdamMini):
        raise ValueError(
            f"Invalid engine: {type(engine).__name__} holds no DeepSpeed ZeRO-1/2 optimizer around a "
            "blockopt.AdamMini (deepspeed.initialize(model=model, optimizer=AdamMini(model), config=...) with "
            "zero_optimization.stage 1 or 2)")
    if getattr(zero, "cpu_offload", False):
        raise ValueError("Invalid DeepSpeed config: zero_optimization.offload_optimizer is not supported with "
                         "blockopt.AdamMini (the offloaded step runs DeepSpeed's own CPU Adam)")
    groups = zero.round_robin_bit16_groups
    if len(groups) != len(client.param_groups):
        raise ValueError(f"DeepSpeed holds {len(groups)} parameter groups, AdamMini {len(client.param_groups)}")
    dp = zero.real_dp_process_group
    if any(g is not dp[0] for g in dp):
        raise ValueError("Invalid DeepSpeed setup: parameter groups on different data-parallel groups are not supported")
    rank, world = dist.get_rank(group=dp[0]), dist.get_world_size(group=dp[0])
    flats = []
    for i, params in enumerate(groups):
        missing = [tuple(p.shape) for p in params if p not in client.param_entries]
        if missing:
            raise ValueError(f"Invalid engine: parameter group {i} holds tensors AdamMini was not built with "
                             f"(shapes {missing[:3]}); build AdamMini over the model passed to deepspeed.initialize")
        layout, _ = flat_layout([client.param_entries[p] for p in params],
                                [int(o) for o in zero.round_robin_bit16_offsets[i]],
                                int(zero.partition_size[i]), rank, world)
        flats.append((i, zero.single_partition_of_fp32_groups[i], layout))
    client.attach_zero(flats, dp[0])
    return client


def _attach_stage3(zero: Any, client: AdamMini) -> AdamMini:
    """ZeRO-3: each parameter is split on its own; a sub-group's flat fp32 buffer holds this rank's
    pieces in order (DeepSpeed's ``fp16_groups``, ``fp32_partitioned_groups_flat``,
    ``sub_group_to_group_id``, each parameter's ``ds_tensor.ds_numel``)."""
    import torch.distributed as dist

    if getattr(zero, "offload_optimizer", False):
        raise ValueError("Invalid DeepSpeed config: zero_optimization.offload_optimizer is not supported with "
                         "blockopt.AdamMini (the offloaded step runs DeepSpeed's own CPU Adam)")
    group = zero.dp_process_group
    rank, world = dist.get_rank(group=group), dist.get_world_size(group=group)
    flats = []
    for sid, params in enumerate(zero.fp16_groups):
        missing = [tuple(getattr(p, "ds_shape", p.shape)) for p in params if p not in client.param_entries]
        if missing:
            raise ValueError(f"Invalid engine: ZeRO-3 sub-group {sid} holds tensors AdamMini was not built with "
                             f"(shapes {missing[:3]}); build AdamMini over the model passed to deepspeed.initialize")
        layout, _ = flat_layout_stage3([client.param_entries[p] for p in params],
                                       [int(p.ds_tensor.ds_numel) for p in params],
                                       rank, world)
        flats.append((int(zero.sub_group_to_group_id[sid]), zero.fp32_partitioned_groups_flat[sid], layout))
    client.attach_zero(flats, group)
    return client


def trainer_callback() -> Any:
    """A ``transformers.TrainerCallback`` that attaches the Trainer's AdamMini to its DeepSpeed
    engine when training begins (after the Trainer has called ``deepspeed.initialize``)::

        from blockopt.integrations import deepspeed as bds, hf as bhf

        args = TrainingArguments(..., deepspeed={"zero_optimization": {"stage": 2},
                                                 "zero_allow_untested_optimizer": True, ...})
        trainer = Trainer(model=model, args=args, train_dataset=ds,
                          optimizer_cls_and_kwargs=bhf.adam_mini_cls_and_kwargs(args),
                          callbacks=[bds.trainer_callback()])

    The DeepSpeed config has no ``"optimizer"`` section: the Trainer builds AdamMini through
    ``optimizer_cls_and_kwargs`` (with DeepSpeed, the Trainer ignores ``optimizers=``).
    """
    from transformers import TrainerCallback

    class AttachAdamMini(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kwargs: Any) -> None:
            if optimizer is not None and getattr(_zero_optimizer(optimizer), "optimizer", None) is not None:
                client = _zero_optimizer(optimizer).optimizer
                if isinstance(client, AdamMini) and not client.zero_layouts:
                    attach(optimizer)

    return AttachAdamMini()
