"""Leaves with collectives still running, the case that aborts at interpreter teardown.

``python torchrun_exit.py hard``: through ``launch.exit_process(0)``; ``soft``: a plain end.
Run under ``torchrun --nproc-per-node 2`` by ``test_launch.py``.
"""

import sys

import torch
import torch.distributed as dist

from blockopt.distributed import launch

launch.init_distributed(device="cpu")
print(f"rank {dist.get_rank()} done")  # no flush: stdout is a pipe, so this is buffered until exit
tensors = [torch.ones(1000) for _ in range(50)]
works = [dist.all_reduce(t, async_op=True) for t in tensors]
del tensors, works  # gloo's worker threads now hold the last references to Python tensors
if sys.argv[1] == "hard":
    launch.exit_process(0)
