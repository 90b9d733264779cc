"""Step time of one kind of second moment on a stack of equal matrices, against fused AdamW, in one
process (interleaved rounds, median): where the factored step stands next to row blocks for a shape.

    python benchmarks/factored_micro.py 768 3072          # rows cols (8 matrices)
    python benchmarks/factored_micro.py 3072 768 --kinds row,factored,element
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

import blockopt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("rows", type=int)
    ap.add_argument("cols", type=int)
    ap.add_argument("--kinds", default="row,factored")
    ap.add_argument("--matrices", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=15)
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
    times: dict[str, list[float]] = {k: [] for k in opts}
    for _ in range(a.rounds):
        for k, o in opts.items():
            t = time.perf_counter()
            for _ in range(5):
                o.step()
            times[k].append((time.perf_counter() - t) / 5 * 1e3)
    med = {k: statistics.median(v) for k, v in times.items()}
    routes = {k: sorted(set(o.routes.values())) for k, o in opts.items() if hasattr(o, "routes")}
    print(f"# {a.matrices} x [{a.rows}, {a.cols}], torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"routes {routes}")
    print("  ".join(f"{k} {v:.2f} ms ({v / med['adamw']:.2f}x)" for k, v in med.items()))


if __name__ == "__main__":
    main()
