"""The Adam-mini step for parameters sharded along dim 0 (FSDP2), on the local shards.

Three phases, so that one step of the whole optimizer needs one collective per
process group however many parameters it has:

1. :func:`partial_block_sums` -- every rank sums ``g**2`` over its part of each
   block it touches (:func:`~blockopt.distributed.sharding.local_block_sq_sums`).
2. :func:`reduce_shared_blocks` -- the partial sums of the blocks that cross a
   shard boundary, for *all* sharded parameters of *all* parameter groups,
   are packed into one flat buffer per process group, whose layout is derived
   from global shapes alone (the same on every rank; zeros where a rank
   touches no part of a block), and summed with one ``all_reduce``. Blocks
   inside one rank's rows need nothing.
3. :func:`sharded_adam_mini_update` -- block means (sum / global element
   count), then :func:`blockopt.kernels.adam_mini.adam_mini_update` (the same
   update as one process) with each shard's layout broadcasting the
   denominators (:func:`shard_applier`).

The same code runs on gloo (CPU) and NCCL (GPU); a CPU buffer on a group
without a CPU backend (CPU-offloaded parameters under NCCL) travels through
the current CUDA device.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from ..kernels.adam_mini import Applier, adam_mini_update
from ..kernels.blocks import is_elementwise
from ..kernels.momentum import Codec
from .boxes import BoxInfo, box_results, box_vectors
from .comm import comm_device
from .sharding import ShardInfo, expand_denominator, local_block_sq_sums

__all__ = [
    "ShardTensors",
    "SharedBlocks",
    "block_statistics_from_sums",
    "partial_block_sums",
    "reduce_all",
    "reduce_shared_blocks",
    "shard_applier",
    "sharded_adam_mini_update",
    "sharded_step",
]


class SharedBlocks(Protocol):
    """Where one tensor's shared blocks go in the reduction buffer: a :class:`ShardInfo` (FSDP2), or
    a ZeRO flat partition's (:func:`blockopt.distributed.zero.zero_step`)."""

    group: Any  # the process group
    num_shared: int  # slots of the buffer this tensor's shared blocks use
    shared_local: torch.Tensor  # int64: indices of the shared blocks in the tensor's block sums
    shared_pos: torch.Tensor  # int64: their positions in its slots


def partial_block_sums(grads: Sequence[torch.Tensor | None], infos: Sequence[ShardInfo],
                       dtypes: Sequence[torch.dtype]) -> list[torch.Tensor | None]:
    """Phase 1: local sums of ``g**2`` per local block, in ``dtypes[i]``; ``None`` where there is no
    gradient or the blocks are single elements (their update needs no sums)."""
    out: list[torch.Tensor | None] = []
    for g, info, dtype in zip(grads, infos, dtypes, strict=True):
        if g is None or is_elementwise(info.layout.geometry):
            out.append(None)
        elif isinstance(info, BoxInfo):
            out.append(info.local_sums(g.to(dtype)))
        else:
            out.append(local_block_sq_sums(g.to(dtype), info))
    return out


def reduce_shared_blocks(sums: Sequence[torch.Tensor | None], infos: Sequence[SharedBlocks],
                         extra: Mapping[object, Sequence[torch.Tensor]] | None = None) -> int:
    """Phase 2, in place: add up the partial sums of shared blocks across ranks.

    ``infos`` must list every sharded parameter of the optimizer in the same
    order on every rank (parameters without a gradient pass ``None`` sums and
    contribute zeros), so that the buffer layouts agree. ``extra``: process group
    -> flat tensors summed over it in the same collective, in place (the
    tensor-parallel boxes' block vectors; a tensor may be listed under several
    groups, which are reduced one after the other). Returns the number of
    collectives issued (one per process group with something to sum, else 0). The
    ZeRO step (:mod:`blockopt.distributed.zero`) reduces its flat partitions'
    shared blocks here too.
    """
    import torch.distributed as dist

    by_group: dict[object, list[int]] = {}
    for i, info in enumerate(infos):
        if info.num_shared:
            by_group.setdefault(info.group, []).append(i)
    extra = extra or {}
    issued = 0
    for group in dict.fromkeys([*by_group, *extra]):
        idx, more = by_group.get(group, []), list(extra.get(group, ()))
        present = [sums[i] for i in idx if sums[i] is not None] + more
        dtype = torch.float32
        for s in present:
            dtype = torch.promote_types(dtype, s.dtype)
        device = present[0].device if present else infos[idx[0]].shared_local.device
        sizes = [infos[i].num_shared for i in idx]
        n_more = sum(t.numel() for t in more)
        buf = torch.zeros(sum(sizes) + n_more, dtype=dtype, device=comm_device(group, device))
        offsets = []
        off = 0
        for i, n in zip(idx, sizes):
            offsets.append(off)
            s, info = sums[i], infos[i]
            if s is not None and info.shared_local.numel():
                buf[off:off + n].index_copy_(0, info.shared_pos.to(buf.device),
                                             s[info.shared_local].to(buf.device, dtype))
            off += n
        if more:
            buf[off:].copy_(torch.cat([t.reshape(-1).to(buf.device, dtype) for t in more]))
        dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group)
        issued += 1
        for i, off, n in zip(idx, offsets, sizes):
            s, info = sums[i], infos[i]
            if s is not None and info.shared_local.numel():
                s.index_copy_(0, info.shared_local, buf[off:off + n][info.shared_pos.to(buf.device)].to(s))
        off = sum(sizes)
        for t in more:
            t.copy_(buf[off:off + t.numel()].view_as(t))
            off += t.numel()
    return issued


def shard_applier(info: ShardInfo | BoxInfo) -> Applier:
    """For :func:`~blockopt.kernels.adam_mini.adam_mini_update`: the per-block denominator broadcast
    over a local shard's layout (rows, columns, slices or flat elements; or a tensor-parallel box)."""
    expand = info.expand if isinstance(info, BoxInfo) else (lambda d: expand_denominator(d, info))

    def apply(w: torch.Tensor, m: torch.Tensor, denom: torch.Tensor, step_size: float) -> None:
        w.addcdiv_(m, expand(denom), value=-step_size)
    return apply


def block_statistics_from_sums(sums: Sequence[torch.Tensor | None], infos: Sequence[ShardInfo],
                               dtypes: Sequence[torch.dtype]) -> list[torch.Tensor | None]:
    """Block means from the reduced sums: sum / global element count (``None`` stays ``None``)."""
    return [None if s is None else (s / info.counts.to(s.dtype)).to(dtype)
            for s, info, dtype in zip(sums, infos, dtypes, strict=True)]


def sharded_adam_mini_update(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    block_exp_avg_sqs: Sequence[torch.Tensor],
    state_steps: Sequence[torch.Tensor],
    infos: Sequence[ShardInfo],
    decay: Sequence[bool],
    sums: Sequence[torch.Tensor | None],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    maximize: bool,
) -> None:
    """Phase 3: the update on local shards (plain tensors), given the reduced block sums.

    ``params[i]``, ``grads[i]`` and ``exp_avgs[i]`` are the local shards,
    ``block_exp_avg_sqs[i]`` the local block range of the second moments. The
    statistic is the reduced sum over the global element count; the update is
    :func:`blockopt.kernels.adam_mini.adam_mini_update` itself, with each
    shard's layout broadcasting the denominators.
    """
    stats = block_statistics_from_sums(sums, infos, [m.dtype for m in exp_avgs])
    adam_mini_update(params, grads, exp_avgs, block_exp_avg_sqs, state_steps, stats, decay,
                     [shard_applier(info) for info in infos], lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                     weight_decay=weight_decay, maximize=maximize)


@dataclass
class ShardTensors:
    """One parameter group's sharded (``Shard(0)``) parameters that have gradients, as the step reads
    them: local shards, in the group's order. ``exp_avgs`` are stored in the momentum format of
    ``codec`` (``None``: fp32); ``every`` lists every sharded parameter of the group, with a gradient
    or not, and ``positions`` where each listed tensor sits in it (the reduction buffer's layout
    must not depend on which gradients a rank has)."""

    params: list[torch.Tensor]
    grads: list[torch.Tensor]
    exp_avgs: list[torch.Tensor]
    second_moments: list[torch.Tensor]
    steps: list[torch.Tensor]
    infos: list[ShardInfo]
    decay: list[bool]
    dtypes: list[torch.dtype]  # the state dtype of each tensor: its block sums are in it
    names: list[str]
    hyper: dict[str, Any]  # lr, beta1, beta2, eps, weight_decay, maximize
    scales: list[torch.Tensor | None] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    codec: Codec | None = None
    every: list[ShardInfo] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)


def sharded_step(groups: Sequence[ShardTensors]) -> None:
    """The step of every sharded parameter of the optimizer: local block sums (phase 1), one
    ``all_reduce`` per process group for the shared blocks of all groups (phase 2), then each
    group's update (phase 3), around its momentum codec."""
    sums, every, all_sums = [], [], []
    for t in groups:
        s = partial_block_sums(t.grads, t.infos, t.dtypes)
        listed: list[torch.Tensor | None] = [None] * len(t.every)
        for pos, x in zip(t.positions, s, strict=True):
            listed[pos] = x
        sums.append(s)
        every.extend(t.every)
        all_sums.extend(listed)
    if every:
        reduce_all(all_sums, every)
    for t, s in zip(groups, sums):
        if not t.params:
            continue
        exp_avgs = t.codec.decode(t.exp_avgs, t.scales) if t.codec is not None else t.exp_avgs
        sharded_adam_mini_update(t.params, t.grads, exp_avgs, t.second_moments, t.steps, t.infos, t.decay, s,
                                 **t.hyper)
        if t.codec is not None:  # each element's index in the full tensor: random bits as one process
            offsets = [info.flat_index(m.device) if isinstance(info, BoxInfo)
                       else info.layout.rows[0] * math.prod(info.layout.shape[1:])
                       for info, m in zip(t.infos, t.exp_avgs)]
            t.codec.encode(t.exp_avgs, exp_avgs, t.steps, t.scales, t.seeds, offsets)


def reduce_all(sums: list[torch.Tensor | None], infos: Sequence[ShardInfo | BoxInfo]) -> int:
    """Phase 2 for every sharded parameter: FSDP2's boundary blocks (one ``all_reduce`` per process
    group) and the tensor-parallel boxes (one per mesh dimension). Returns the collectives issued."""
    fsdp = [i for i, info in enumerate(infos) if not isinstance(info, BoxInfo)]
    box = [i for i, info in enumerate(infos) if isinstance(info, BoxInfo)]
    box_sums, box_infos = [sums[i] for i in box], [infos[i] for i in box]
    todo, fulls, stages = box_vectors(box_sums, box_infos)
    issued = reduce_shared_blocks([sums[i] for i in fsdp], [infos[i] for i in fsdp], stages)
    box_results(box_sums, box_infos, todo, fulls)
    return issued
