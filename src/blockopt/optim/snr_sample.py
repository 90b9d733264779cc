"""The sample that the in-budget calibration measures SNR on (``AdamMini(calibrate=N)``).

During the calibration window the optimizer steps with its own blocks; nobody holds AdamW's
per-element second moment. To tell which partition of each tensor has the most constant blocks,
:class:`SNRSample` keeps AdamW's ``v`` (``v <- beta2 v + (1 - beta2) g**2``) on a fixed random
sample of elements only: for every tensor and candidate partition, up to ``max_blocks`` blocks and
inside each a share of the candidate's elements, as :class:`blockopt.partition.SampledSNRMeter`
draws them. The SNR of a candidate is then the mean over its sampled blocks of
``mean(v)**2 / var(v)``.

Memory: the sample lives in the optimizer's state (``snr_sample_index``, int32 or int64, and
``snr_sample_v``, fp32, per parameter), so it is counted wherever the state is. Its size is set
once so that it takes at most ``share`` (2 %) of fp32 AdamW's state bytes. It is freed at the switch.

Under FSDP2 each rank holds the gradient rows of its shard: every rank writes the sampled elements
it holds into one buffer (zeros elsewhere; of a replicated tensor, rank 0 only) and one
``all_reduce`` per step sums them, so that every rank keeps the same sample ``v`` bit for bit, the
one a single process keeps.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from ..distributed.dtensor import is_dtensor, local_tensor
from ..kernels.blocks import element_block_ids
from ..partition import PartitionPlan
from ..partition.snr import block_ratio_mean, candidates, draw_block_sample

__all__ = ["SAMPLE_SHARE", "SNRSample"]

#: the largest share of fp32 AdamW's state bytes that the calibration's sample may take
SAMPLE_SHARE = 0.02

_INDEX, _V = "snr_sample_index", "snr_sample_v"


class SNRSample:
    """Which elements of which tensors the calibration samples (plain data, the same on every rank).

    ``structural``: the plan whose entries give each tensor's candidates; ``names``: the tensors to
    measure. Sizes: per tensor and candidate, ``min(numel, max_blocks * max_elements)`` elements,
    scaled down together until the sample's bytes fit in ``share`` of AdamW's state.
    """

    def __init__(self, structural: PartitionPlan, names: Iterable[str], *, share: float = SAMPLE_SHARE,
                 max_blocks: int = 64, max_elements: int = 256, seed: int = 0) -> None:
        names = set(names)
        entries = [e for e in structural.entries if e.name in names and candidates(e)]
        cap = share * structural.adamw_state_bytes()
        wanted = [(e, label, geo, min(e.numel, max_blocks * max_elements))
                  for e in entries for label, geo in candidates(e).items()]
        need = sum(k * (4 + _index_dtype(e.numel).itemsize) for e, _, _, k in wanted)
        scale = min(1.0, cap / need) if need else 1.0
        gen = torch.Generator().manual_seed(seed)
        #: name -> [(label, geometry, count)] in the order of its index; name -> flat indices
        self.layout: dict[str, list[tuple[str, object, int]]] = {}
        self.index: dict[str, torch.Tensor] = {}
        self.shapes = {e.name: e.shape for e in entries}
        for e, label, geo, k in wanted:
            k = math.floor(k * scale)
            if k < 4:  # too few to tell blocks apart: the candidate is not measured
                continue
            n_blocks = min(geo.num_blocks, max_blocks, max(2, k // 16))
            idx = torch.cat(draw_block_sample(e.shape, geo, n_blocks, max(2, k // n_blocks), gen))
            self.layout.setdefault(e.name, []).append((label, geo, idx.numel()))
            self.index[e.name] = torch.cat([self.index.get(e.name, idx[:0]), idx])
        for name, idx in self.index.items():
            self.index[name] = idx.to(_index_dtype(math.prod(self.shapes[name])))

    @property
    def num_values(self) -> int:
        return sum(i.numel() for i in self.index.values())

    @property
    def nbytes(self) -> int:
        """Bytes the sample keeps in the optimizer's state (index and ``v``)."""
        return sum(i.numel() * (i.element_size() + 4) for i in self.index.values())

    # --- in the optimizer's state ---------------------------------------------------------------
    @torch.no_grad()
    def update(self, opt: Any) -> None:
        """Fold this step's gradients into every sampled ``v`` (one ``all_reduce`` under FSDP2)."""
        todo, parts, group, sharded = [], [], None, False
        infos = opt.shard_infos
        for group_ in opt.param_groups:
            beta2 = group_["betas"][1]
            for p in group_["params"]:
                name = opt.param_entries[p].name
                if name not in self.index or p.grad is None:
                    continue
                st = opt.state[p]
                if _INDEX not in st:
                    device = local_tensor(p).device
                    st[_INDEX] = self.index[name].to(device)
                    st[_V] = torch.zeros(self.index[name].numel(), dtype=torch.float32, device=device)
                idx = st[_INDEX].to(torch.int64)
                if is_dtensor(p):
                    sharded = True
                    info = infos.get(p)
                    group = info.group if info is not None and group is None else group
                    parts.append(_local_part(p, idx, info, group))
                else:
                    parts.append(p.grad.detach().reshape(-1)[idx].float())
                todo.append((st[_V], beta2))
        if sharded:
            import torch.distributed as dist

            buf = torch.cat(parts)
            dist.all_reduce(buf, group=group)
            parts = list(buf.split([v.numel() for v, _ in todo]))
        for (v, beta2), g in zip(todo, parts):
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)

    def estimates(self, opt: Any) -> dict[str, dict[str, float]]:
        """Per tensor and candidate, the SNR of the sampled ``v`` (``nan`` where no block has two values)."""
        out = {}
        for p in opt.params_in_order():
            name = opt.param_entries[p].name
            st = opt.state.get(p) or {}
            if name not in self.layout or _V not in st:
                continue
            v, idx = st[_V].to(torch.float64), st[_INDEX].to(torch.int64)
            by, off = {}, 0
            for label, geo, count in self.layout[name]:
                ids = element_block_ids(self.shapes[name], geo, idx[off:off + count])
                by[label] = block_ratio_mean(v[off:off + count], ids)
                off += count
            out[name] = by
        return out

    @staticmethod
    def free(opt: Any) -> None:
        """Drop the sample from the optimizer's state (the switch)."""
        for st in opt.state.values():
            st.pop(_INDEX, None)
            st.pop(_V, None)


def _index_dtype(numel: int) -> torch.dtype:
    return torch.int32 if numel < 2**31 else torch.int64


def _local_part(p: torch.Tensor, idx: torch.Tensor, info, group) -> torch.Tensor:
    """This rank's values of the sampled elements of a DTensor parameter's gradient (zeros where it
    holds none): the rows of its ``Shard(0)`` range, or everything on rank 0 when replicated."""
    import torch.distributed as dist

    g = local_tensor(p.grad).detach().reshape(-1)
    out = torch.zeros(idx.numel(), dtype=torch.float32, device=g.device)
    if info is None:  # Replicate(): every rank holds it all, rank 0 speaks
        return g[idx].float() if dist.get_rank(group) == 0 else out
    r0, r1 = info.layout.rows
    row = math.prod(p.shape[1:])
    mine = (idx >= r0 * row) & (idx < r1 * row)
    if bool(mine.any()):
        out[mine] = g[idx[mine] - r0 * row].float()
    return out
