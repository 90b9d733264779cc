"""Host time of the Triton step's multi-tensor launch: what `step()` costs the CPU per step besides
the kernels, for a model preset (default: the 1.1B Llama of the GPU check).

Runs anywhere: the tensors are on the meta device and the kernel launch is replaced by a no-op, so
this times only the host work of ``_multi_launches`` (plan lookup, per-step tables of gradient
addresses, seeds and bias corrections). On a GPU, the two small copies and the 2-3 launches come on
top; a launch per segment (``multi_tensor=False``) costs one Triton launch per segment instead.

    python benchmarks/triton_host_time.py [--model llama-1b] [--steps 200]
"""

from __future__ import annotations

import argparse
import time

import torch

import blockopt
from blockopt.kernels import adam_mini_triton as T
from blockopt.kernels.adam_mini_triton import _runs
from blockopt.models import build_model


class _NoLaunch:
    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama-1b")
    ap.add_argument("--steps", type=int, default=200)
    args = ap.parse_args(argv)
    if not T.triton_available():
        raise SystemExit("needs Triton: pip install 'blockopt[gpu]'")
    model = build_model(args.model, device="meta", seed=None)
    plan = blockopt.partition(model)
    named = list(model.named_parameters())
    params = [torch.empty(p.shape, device="meta") for _, p in named]
    grads = [torch.empty(p.shape, device="meta") for _, p in named]
    exp_avgs = [torch.empty(p.shape, device="meta") for _, p in named]
    vs = [torch.empty(plan[n].num_blocks, device="meta") for n, _ in named]
    geoms = [plan[n].geometry for n, _ in named]
    decay = [plan[n].weight_decay for n, _ in named]
    seeds = list(range(len(named)))
    steps = [torch.tensor(10.0) for _ in named]
    segments = sum(len(_runs(tuple(p.shape), g)) for p, g in zip(params, geoms))
    T._multi_kernel = _NoLaunch()
    kw = {"lr": 1e-3, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8, "weight_decay": 0.1, "maximize": False}
    T._multi_launches(params, grads, exp_avgs, vs, steps, geoms, decay, seeds, **kw)  # builds the plan
    t0 = time.perf_counter()
    for _ in range(args.steps):
        T._multi_launches(params, grads, exp_avgs, vs, steps, geoms, decay, seeds, **kw)
    ms = (time.perf_counter() - t0) / args.steps * 1e3
    launches = len(T._multi_plan(params, grads, exp_avgs, vs, geoms, decay, seeds).launches)
    n = sum(p.numel() for p in params)
    print(f"{args.model}: {n / 1e9:.2f}B parameters, {len(params)} tensors, {segments} segments")
    print(f"host time per step: {ms:.3f} ms for {launches} launches (a launch per segment: {segments})")


if __name__ == "__main__":
    main()
