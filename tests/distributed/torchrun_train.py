"""A data-parallel training script for ``torchrun``, built on ``blockopt.distributed.launch``.

    torchrun --nproc-per-node 2 torchrun_train.py OUT.json

Trains the test model for 3 steps with FSDP2 and then with DDP (float64, gloo
on CPU) and writes, from rank 0 only, each run's per-step mean loss and final
full parameters' sums to ``OUT.json``.
"""

from __future__ import annotations

import json
import sys

import torch
import torch.nn.functional as F
from dist_helpers import batches, make_optimizer, tiny_model

from blockopt.distributed import launch


def main(out: str) -> None:
    ctx = launch.init_distributed(device="cpu")
    torch.set_num_threads(1)
    results = {"world_size": ctx.world_size, "backend": ctx.backend}
    for parallel in ("fsdp", "ddp"):
        model = launch.wrap_model(tiny_model(), parallel)
        opt = make_optimizer(launch.unwrap(model))
        losses = []
        for x in batches(3):
            xb = launch.shard_batch(x, ctx)
            opt.zero_grad()
            logits = model(xb)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), xb.reshape(-1))
            loss.backward()
            opt.step()
            losses.append(launch.all_reduce_mean(loss))
        full = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().double().sum().item()
                for n, p in launch.unwrap(model).named_parameters()}
        results[parallel] = {"losses": losses, "param_sums": full}
    wrote = launch.write_on_rank0(out, json.dumps(results))
    assert wrote == ctx.is_main
    launch.barrier()
    launch.cleanup()


if __name__ == "__main__":
    main(sys.argv[1])
    launch.exit_process(0)
