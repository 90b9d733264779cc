"""Where the default step's time goes on a built-in model, by kind of second moment.

The default plan's tensors are put in groups: row blocks (and other blocks of consecutive elements),
factored matrices up to 1,024 columns ("narrow"), wider factored matrices ("wide"), and per-element
tensors; "all" is the whole model. Each group is stepped alone, by ``AdamMini(model)`` (its default
plan; only the group's parameters have gradients) and by fused ``torch.optim.AdamW`` on the same
tensors, one step each, alternately. Every round gives each group a ratio to AdamW, and the ratios
are also split by the memory bandwidth AdamW streamed in that round (28 bytes per parameter over
its step time): on a shared machine the bandwidth moves within seconds, and the ratios with it.

    python benchmarks/step_parts.py                          # gpt2-160m, 60 rounds
    python benchmarks/step_parts.py --model gpt2-20m --rounds 100 --fast 70 --slow 60
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

import torch

import blockopt
from blockopt.models import build_model

sys.path.insert(0, os.path.dirname(__file__))
from bandwidth import add_bandwidth_split, at_least_one, split_by_bandwidth

NARROW_COLS = 1024  # the C++ kernel steps factored rows up to this many columns one at a time


def group_of(entry) -> str:
    if entry.kind == "factored":
        return "narrow" if entry.shape[-1] <= NARROW_COLS else "wide"
    return "element" if entry.kind == "element" else "blocks"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gpt2-160m")
    ap.add_argument("--rounds", type=at_least_one, default=60)
    add_bandwidth_split(ap)
    a = ap.parse_args(argv)
    base = build_model(a.model, seed=0)
    plan = blockopt.AdamMini(base).plan
    groups: dict[str, list[str]] = {"blocks": [], "narrow": [], "wide": [], "element": []}
    for e in plan.trained:
        groups[group_of(e)].append(e.name)
    groups = {k: v for k, v in groups.items() if v}
    groups["all"] = [n for n, _ in base.named_parameters()]
    gen = torch.Generator().manual_seed(0)
    grads = {n: torch.randn(p.shape, generator=gen) * 1e-3 for n, p in base.named_parameters()}

    runs = {}  # group -> (AdamMini, AdamW, parameter count, routes AdamMini took)
    for k, members in groups.items():
        model = copy.deepcopy(base)
        named = dict(model.named_parameters())
        chosen = [named[n] for n in members]
        for n in members:
            named[n].grad = grads[n].clone()
        mini = blockopt.AdamMini(model, lr=1e-4)
        adamw = torch.optim.AdamW(chosen, lr=1e-4, fused=True)
        for _ in range(2):
            mini.step()
            adamw.step()
        routes = sorted(set(mini.routes.values()))
        runs[k] = (mini, adamw, sum(p.numel() for p in chosen), routes)

    times = {k: {"mini": [], "adamw": []} for k in runs}
    for r in range(a.rounds):
        for k, (mini, adamw, _, _) in runs.items():
            order = (("adamw", adamw), ("mini", mini)) if r % 2 == 0 else (("mini", mini), ("adamw", adamw))
            for label, opt in order:
                t = time.perf_counter()
                opt.step()
                times[k][label].append(time.perf_counter() - t)

    print(f"# {a.model}, torch {torch.__version__}, {torch.get_num_threads()} threads, {a.rounds} rounds; "
          f"each round's AdamMini step over fused AdamW's, median")
    print(f"{'group':<9}{'params':>9}{'AdamMini ms':>13}{'AdamW ms':>10}{'ratio':>8}"
          f"{f'  >= {a.fast:g} GB/s':>16}{f'  < {a.slow:g} GB/s':>16}  routes")
    for k, (_, _, n, routes) in runs.items():
        tm, ta = times[k]["mini"], times[k]["adamw"]
        ratios = [m / w for m, w in zip(tm, ta)]
        gbps = [n * 28 / w / 1e9 for w in ta]
        fast, n_fast, slow, n_slow = split_by_bandwidth(ratios, gbps, a.fast, a.slow)
        cells = [f"{r:.3f}x (n={c})" if r is not None else "- (n=0)" for r, c in ((fast, n_fast), (slow, n_slow))]
        print(f"{k:<9}{n / 1e6:>8.1f}M{statistics.median(tm) * 1e3:>13.2f}{statistics.median(ta) * 1e3:>10.2f}"
              f"{statistics.median(ratios):>7.3f}x{cells[0]:>16}{cells[1]:>16}  {','.join(routes)}")


if __name__ == "__main__":
    main()
