"""Distributed Adam-mini: FSDP2 / DTensor shards and DeepSpeed ZeRO partitions, one reduction per
step, DCP-compatible state.

Distributed training with :class:`blockopt.AdamMini` (``torchrun``; helpers in
:mod:`blockopt.distributed.launch`):

* **DDP** works unchanged: build the optimizer on ``ddp.module`` (or the
  model before wrapping); DDP averages gradients in backward, so every rank
  runs the ordinary step on identical full tensors and stays in sync.
* **FSDP2** (``fully_shard``): build the optimizer *after* sharding. The
  plan is the unsharded model's (DTensor shapes are global). Parameters
  are DTensors with ``Shard(0)`` on a 1-D mesh (uneven ``torch.chunk``
  shards and empty shards included; ``Replicate()`` also works). Rows inside one shard need no
  communication; blocks that cross a shard boundary (split heads,
  whole-tensor blocks, column blocks) have their partial sums added with
  **one** ``all_reduce`` per process group per step, whatever the number
  of parameters (:mod:`blockopt.distributed.step`). The step runs on the
  local shards; ``exp_avg`` is a DTensor like the parameter and each rank
  keeps the second moments of the blocks it touches. The same code runs
  on gloo and NCCL; the group comes from the parameter's device mesh.
* **Tensor parallel, and FSDP2 + TP on a 2-D mesh** (torch's
  ``ColwiseParallel`` / ``RowwiseParallel`` / ``SequenceParallel``, FSDP2's
  strided shards over them, ``shard_placement_fn`` on another dimension):
  each rank holds a box of the parameter; the block sums are reduced over
  each mesh dimension that shards it, one ``all_reduce`` per mesh dimension
  per step (:mod:`blockopt.distributed.boxes`). ``Partial`` parameters raise
  ``ValueError``; ``SequenceParallel``'s ``Partial`` gradients are summed
  first.
* **DeepSpeed ZeRO 1-3**: :func:`blockopt.integrations.deepspeed.attach`
  maps the plan onto ZeRO's flat partitions (:mod:`blockopt.distributed.zero`);
  the step reduces the blocks split between ranks with FSDP2's reduction.
* **Checkpoints**: ``AdamMini.state_dict()`` returns full second-moment vectors
  (collective), so ``torch.distributed.checkpoint`` with
  ``get_optimizer_state_dict`` / ``set_optimizer_state_dict`` saves at one
  world size and loads at another; see
  :mod:`blockopt.distributed.checkpoint`. A single-process ``torch.save``
  state also loads into a sharded optimizer.
* **CPU offload**: FSDP2's ``CPUOffloadPolicy`` keeps parameters,
  gradients and the optimizer's state on the CPU and the step runs there
  (tested on gloo, with ``pin_memory=False`` on machines without CUDA);
  under NCCL the per-step reduction buffer is sent through the current
  CUDA device.

The modules:

* :mod:`~blockopt.distributed.sharding` -- which blocks a rank holds when a
  parameter is split along dim 0, and which blocks cross a shard boundary
  (pure arithmetic on global shapes, the same on every rank).
* :mod:`~blockopt.distributed.boxes` -- tensor-parallel and 2-D layouts: the
  box of the global tensor a rank holds, its blocks, and the sums reduced
  over each mesh dimension that shards it.
* :mod:`~blockopt.distributed.dtensor` -- supported placements (``Shard(d)``,
  strided shards and ``Replicate()`` on 1-D and 2-D meshes), checks, the
  per-parameter :class:`ShardInfo` or ``BoxInfo``.
* :mod:`~blockopt.distributed.step` -- the sharded step (:func:`~blockopt.distributed.step.sharded_step`):
  local partial sums, one ``all_reduce`` per process group per step for all
  boundary blocks, update.
* :mod:`~blockopt.distributed.zero` -- ZeRO's flat partitions mapped onto the
  plan, and their step (:func:`~blockopt.distributed.zero.zero_step`).
* :mod:`~blockopt.distributed.state` -- full second-moment vectors for
  checkpoints (any world size can load them) and back.
* :mod:`~blockopt.distributed.checkpoint` -- DCP save/load with the plan checked first.
* :mod:`~blockopt.distributed.launch` -- ``torchrun`` helpers: initialise,
  wrap a model with FSDP2 or DDP, write from rank 0 only.

:class:`blockopt.AdamMini` uses these by itself when it sees DTensor
parameters or is attached to DeepSpeed; nothing here needs to be called by
users except the launch and checkpoint helpers.
"""

from .sharding import ShardInfo, ShardLayout, chunk_rows, shard_layout

__all__ = ["ShardInfo", "ShardLayout", "chunk_rows", "shard_layout"]
