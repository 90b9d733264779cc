"""Step time of one kind of second moment on a stack of equal matrices, against fused AdamW, in one
process (interleaved rounds, median): where the factored step stands next to row blocks for a shape.

Each round times every kind right after fused AdamW, so each round gives a ratio to AdamW; the
ratios are also split by the memory bandwidth AdamW streamed in that round (28 bytes per parameter),
because on a shared machine the bandwidth moves within seconds and the ratios move with it.

    python benchmarks/factored_micro.py 768 3072          # rows cols (8 matrices)
    python benchmarks/factored_micro.py 3072 768 --kinds row,factored,element --rounds 60
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

sys.path.insert(0, os.path.dirname(__file__))
from bandwidth import add_bandwidth_split, at_least_one, split_by_bandwidth


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("rows", type=int)
    ap.add_argument("cols", type=int)
    ap.add_argument("--kinds", default="row,factored")
    ap.add_argument("--matrices", type=at_least_one, default=8)
    ap.add_argument("--rounds", type=at_least_one, default=15)
    add_bandwidth_split(ap)
    a = ap.parse_args()
    torch.manual_seed(0)
    base = torch.nn.Sequential(*[torch.nn.Linear(a.cols, a.rows, bias=False) for _ in range(a.matrices)])
    grads = [torch.randn_like(p) for p in base.parameters()]
    opts = {}
    for kind in a.kinds.split(","):
        m = copy.deepcopy(base)
        opts[kind] = blockopt.AdamMini(m, lr=1e-3, overrides={r".*": kind}, rules="blocks", state_budget=None)
        for p, g in zip(m.parameters(), grads):
            p.grad = g
    ref = copy.deepcopy(base)
    opts["adamw"] = torch.optim.AdamW(ref.parameters(), lr=1e-3, fused=True)
    for p, g in zip(ref.parameters(), grads):
        p.grad = g
    for o in opts.values():
        o.step()
    n = sum(p.numel() for p in base.parameters())
    times: dict[str, list[float]] = {k: [] for k in opts}
    for r in range(a.rounds):
        order = ["adamw"] + [k for k in opts if k != "adamw"]
        for k in order if r % 2 == 0 else order[::-1]:  # AdamW first, then last: next to every kind
            o = opts[k]
            t = time.perf_counter()
            for _ in range(5):
                o.step()
            times[k].append((time.perf_counter() - t) / 5 * 1e3)
    med = {k: statistics.median(v) for k, v in times.items()}
    routes = {k: sorted(set(o.routes.values())) for k, o in opts.items() if hasattr(o, "routes")}
    print(f"# {a.matrices} x [{a.rows}, {a.cols}], torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"routes {routes}")
    print("  ".join(f"{k} {v:.2f} ms ({v / med['adamw']:.2f}x)" for k, v in med.items()))
    gbps = [n * 28 / (t / 1e3) / 1e9 for t in times["adamw"]]
    splits = {k: split_by_bandwidth([t / w for t, w in zip(times[k], times["adamw"])], gbps, a.fast, a.slow)
              for k in opts if k != "adamw"}
    for j, label in enumerate([f"AdamW >= {a.fast:g} GB/s", f"AdamW < {a.slow:g} GB/s"]):
        count = next(iter(splits.values()))[2 * j + 1] if splits else 0
        print(f"rounds with {label}: {count}; median ratio per round: "
              + "  ".join(f"{k} {v[2 * j]:.2f}x" if v[2 * j] is not None else f"{k} -" for k, v in splits.items()))


if __name__ == "__main__":
    main()
