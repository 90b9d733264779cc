"""Table for benchmarks/blr_speedup.sh: steps to AdamW's final held-out loss, with and without
Blockwise LR, at two budgets (llama-tiny, default corpus, 3 seeds, each optimizer at the best lr of
its own sweep by mean final held-out loss, the bench's rule).

"Steps to AdamW loss" is the bench's own figure (``blockopt.bench.metrics.steps_to_reference_loss``):
the first evaluation at which an optimizer's held-out loss, the mean over seeds at its best lr, is at
or below AdamW's final one (mean over seeds at AdamW's best lr). The speed-up is AdamW's own step
count to that loss (the budget) over it. Per seed, the same against that seed's AdamW run.

    python benchmarks/blr_speedup_table.py --write   # rebuild benchmarks/results/blr_speedup/*.json from runs/
    python benchmarks/blr_speedup_table.py           # print the table from those files

A second table (after S600) puts the +BLR optimizers at 600 steps against AdamW at 1,200: the 2x
claim, run against run, without the schedule's end in the way (every run's cosine decay ends at its own
budget, so a run rarely reaches another's final loss before its own last tenth).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from blockopt.bench.metrics import aggregate, steps_to_reference_loss

REPO = Path(__file__).resolve().parent.parent
OPTS = ["adamw", "adamw+blr", "adam-mini-default", "adam-mini-default+blr"]
LABELS = {"adamw": "AdamW", "adamw+blr": "AdamW + BLR", "adam-mini-default": "AdamMini default",
          "adam-mini-default+blr": "AdamMini default + BLR"}
SWEEPS = {300: ["runs/blr/S300_a", "runs/blr/S300_b"],
          1200: ["runs/blr/S1200_a", "runs/blr/S1200_b", "runs/blr/S1200_c", "runs/lq/L1_adamw", "runs/lq/L2_default"]}


def _load(root: Path, dirs: list[str]) -> tuple[list[dict], list[dict], dict, int]:
    runs, records, grids, steps = [], [], {}, set()
    for d in dirs:
        p = root / d
        s = json.loads((p / "summary.json").read_text())
        runs += s["runs"]
        steps.add(s["protocol"]["steps"])
        for opt, grid in s["protocol"]["lr_grids"].items():  # an optimizer's grid may span sweeps (S1200c)
            grids[opt] = sorted(set(grids.get(opt, [])) | set(grid))
        records += [json.loads(ln) for ln in (p / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    if len(steps) != 1:
        raise SystemExit(f"sweeps {dirs} ran different step counts: {sorted(steps)}")
    return runs, records, grids, steps.pop()


def _first_at_or_below(curve: list[tuple[int, float]], target: float) -> int | None:
    return next((s for s, v in curve if v <= target), None)


def build(root: Path, budget: int) -> dict:
    runs, records, grids, steps_run = _load(root, SWEEPS[budget])
    opts = [o for o in OPTS if o in grids]
    agg = aggregate(runs, opts, grids)
    steps = steps_to_reference_loss(agg["winners"], runs, records)
    out = {"budget": steps_run, "sweeps": SWEEPS[budget], "target": steps["target"], "optimizers": {}}
    curves: dict[str, list[tuple[int, float]]] = {}
    for rec in records:
        if rec.get("val_loss") is not None:
            curves.setdefault(rec["run"], []).append((int(rec["step"]), float(rec["val_loss"])))
    best_runs = {}
    for w in agg["winners"]:
        opt = w["optimizer"]
        rs = {r["seed"]: r for r in runs if r["optimizer"] == opt and r.get("status") == "ok"
              and w.get("best_lr") is not None and math.isclose(r["lr"], w["best_lr"], rel_tol=1e-12)}
        best_runs[opt] = rs
        grid = sorted(grids[opt])
        out["optimizers"][opt] = {
            "best_lr": w.get("best_lr"), "edge": w.get("best_lr") in (grid[0], grid[-1]),
            "final": {str(s): r["final_val_loss"] for s, r in sorted(rs.items())},
            "steps_to_adamw_loss": steps["steps"].get(opt),
            "curves": {str(s): sorted(curves.get(r["run_id"], [])) for s, r in sorted(rs.items())},
        }
    ref = best_runs.get("adamw", {})
    for opt, o in out["optimizers"].items():
        o["per_seed_steps"] = {
            str(s): _first_at_or_below(sorted(curves.get(r["run_id"], [])), ref[s]["final_val_loss"])
            for s, r in sorted(best_runs[opt].items()) if s in ref}
    return out


HALF = {"budget": 600, "against": 1200,
        "sweeps": ["runs/blr/S600_a", "runs/blr/S600_b", "runs/blr/S600_c", "runs/blr/S600_d", "runs/blr/S600_e"]}


def build_half(root: Path, full: dict) -> dict:
    """The +BLR optimizers at half the budget (their best lr there, by mean final held-out loss)
    against AdamW's final loss at the full budget (``full``: the S1200 record), mean and per seed."""
    dirs = [d for d in HALF["sweeps"] if (root / d / "summary.json").is_file()]  # AdamW's (S600c/d) may be absent
    runs, _records, grids, steps_run = _load(root, dirs)
    opts = [o for o in OPTS if o in grids]
    agg = aggregate(runs, opts, grids)
    ref = full["optimizers"]["adamw"]["final"]
    out = {"budget": steps_run, "against": full["budget"], "sweeps": dirs, "adamw_final": ref, "optimizers": {}}
    for w in agg["winners"]:
        opt, lr = w["optimizer"], w.get("best_lr")
        rs = {r["seed"]: r for r in runs if r["optimizer"] == opt and r.get("status") == "ok" and lr is not None
              and math.isclose(r["lr"], lr, rel_tol=1e-12)}
        grid = sorted(grids[opt])
        out["optimizers"][opt] = {"best_lr": lr, "grid": grid, "edge": lr in (grid[0], grid[-1]),
                                  "final": {str(k): r["final_val_loss"] for k, r in sorted(rs.items())}}
    return out


def half_table(d: dict) -> list[str]:
    ref = d["adamw_final"]
    ref_mean = sum(ref.values()) / len(ref)
    lines = [(f"| optimizer at {d['budget']:,} steps | lr grid | best lr | final held-out loss (mean) | "
              f"vs AdamW at {d['against']:,} steps ({ref_mean:.4f}) | seeds at or below AdamW's |"),
             "|---|---|---|---|---|---|"]
    for opt, o in d["optimizers"].items():
        mean = sum(o["final"].values()) / len(o["final"])
        below = sum(v <= ref[k] for k, v in o["final"].items() if k in ref)
        grid = " / ".join(f"{x:g}" for x in o["grid"])
        lines.append(f"| {LABELS[opt]} | {grid} | {o['best_lr']:g}{' (edge)' if o['edge'] else ''} | {mean:.4f} | "
                     f"{(mean / ref_mean - 1) * 100:+.2f} % | {below} of {len(o['final'])} |")
    return lines


def table(data: list[dict]) -> list[str]:
    lines = [("| budget | optimizer | best lr | final held-out loss (mean of 3 seeds) | vs AdamW | "
              "steps to AdamW's final loss | speed-up | per seed (steps) |"),
             "|---|---|---|---|---|---|---|---|"]
    for d in data:
        ref = d["optimizers"].get("adamw")
        ref_mean = sum(ref["final"].values()) / len(ref["final"]) if ref else None
        ref_steps = ref["steps_to_adamw_loss"] if ref else None
        for opt in OPTS:
            o = d["optimizers"].get(opt)
            if o is None:
                continue
            mean = sum(o["final"].values()) / len(o["final"])
            st = o["steps_to_adamw_loss"]
            speed = f"{ref_steps / st:.2f}x" if st and ref_steps else ("never" if st is None else "")
            gap = f"{(mean / ref_mean - 1) * 100:+.2f} %" if ref_mean and opt != "adamw" else ""
            per = " / ".join("never" if v is None else str(v) for v in o["per_seed_steps"].values())
            lines.append(f"| {d['budget']:,} | {LABELS[opt]} | {o['best_lr']:g}{' (edge)' if o['edge'] else ''} | "
                         f"{mean:.4f} | {gap} | {st if st is not None else 'never'} | {speed} | {per} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--write", action="store_true", help="rebuild the JSON files from the sweeps under runs/")
    ap.add_argument("--root", type=Path, default=REPO, help="the folder holding runs/ (default: the repository)")
    ap.add_argument("--res", type=Path, default=REPO / "benchmarks" / "results" / "blr_speedup",
                    help="where the JSON files are (default benchmarks/results/blr_speedup)")
    args = ap.parse_args()
    args.res.mkdir(parents=True, exist_ok=True)
    if args.write:
        for budget, dirs in SWEEPS.items():
            if all((args.root / d / "summary.json").is_file() for d in dirs):
                (args.res / f"S{budget}.json").write_text(json.dumps(build(args.root, budget), indent=1) + "\n")
        full = args.res / f"S{HALF['against']}.json"
        if full.is_file() and all((args.root / d / "summary.json").is_file() for d in HALF["sweeps"][:2]):
            half = build_half(args.root, json.loads(full.read_text()))
            (args.res / f"half_S{HALF['budget']}.json").write_text(json.dumps(half, indent=1) + "\n")
    data = [json.loads(p.read_text()) for p in sorted(args.res.glob("S*.json"), key=lambda p: int(p.stem[1:]))]
    print("\n".join(table(data)) if data else "(no finished sweeps)")
    half_file = args.res / f"half_S{HALF['budget']}.json"
    if half_file.is_file():
        print()
        print("\n".join(half_table(json.loads(half_file.read_text()))))


if __name__ == "__main__":
    main()
