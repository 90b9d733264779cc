"""Distributed Adam-mini: FSDP2 / DTensor shards, one reduction per step, DCP-compatible state.

* :mod:`~blockopt.distributed.sharding` -- which blocks a rank holds when a
  parameter is split along dim 0, and which blocks cross a shard boundary
  (pure arithmetic on global shapes, the same on every rank).
* :mod:`~blockopt.distributed.dtensor` -- supported placements (``Shard(0)``
  on a 1-D mesh, ``Replicate()``), checks, the per-parameter :class:`ShardInfo`.
* :mod:`~blockopt.distributed.step` -- the sharded step: local partial sums,
  one ``all_reduce`` per process group per step for all boundary blocks, update.
* :mod:`~blockopt.distributed.state` -- full second-moment vectors for
  checkpoints (any world size can load them) and back.
* :mod:`~blockopt.distributed.launch` -- ``torchrun`` helpers: initialise,
  wrap a model with FSDP2 or DDP, write from rank 0 only.

:class:`blockopt.AdamMini` uses these by itself when it sees DTensor
parameters; nothing here needs to be called by users except the launch helpers.
"""

from .sharding import ShardInfo, ShardLayout, chunk_rows, shard_layout

__all__ = ["ShardInfo", "ShardLayout", "chunk_rows", "shard_layout"]
