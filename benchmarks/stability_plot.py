"""Final held-out loss against learning rate (mean over seeds; a cross where any seed diverged), one
panel per warmup, from the summaries of benchmarks/stability_grid.sh; prints the table as Markdown.

    python benchmarks/stability_plot.py benchmarks/results/stability --out docs/stability.png
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

# the plot's names, by the bench's optimizer key (the labels the bench writes differ by release)
LABELS = {"adamw": "AdamW", "adam-mini": "Adam-mini, official rules",
          "adam-mini-default": "AdamMini's default (matrices factored, budget 0.55)",
          "adam-mini-default:rules=blocks": "AdamMini(rules='blocks') (blocks only, budget 0.55)"}


def _table(summary):
    """{optimizer label: {lr: (mean final loss or None, diverged seeds, seeds)}}"""
    out: dict[str, dict[float, tuple[float | None, int, int]]] = {}
    for r in summary["runs"]:
        row = out.setdefault(LABELS.get(r["optimizer"], r["label"]), {}).setdefault(r["lr"], [])
        row.append(r)
    table = {}
    for label, by_lr in out.items():
        table[label] = {}
        for lr, runs in sorted(by_lr.items()):
            ok = [r["final_val_loss"] for r in runs if r["final_val_loss"] is not None and not r["diverged"]]
            bad = sum(1 for r in runs if r["diverged"] or r["final_val_loss"] is None)
            table[label][lr] = (sum(ok) / len(ok) if ok and not bad else None, bad, len(runs))
    return table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder")
    ap.add_argument("--out", default="docs/stability.png")
    args = ap.parse_args()
    from matplotlib.figure import Figure

    # one panel per warmup: warmup30.summary.json and warmup30-default.summary.json share one
    panels: dict[str, dict] = {}
    for f in sorted(Path(args.folder).glob("*.summary.json")):
        runs = panels.setdefault(f.name.split(".")[0].split("-")[0], {"runs": []})["runs"]
        runs += json.loads(f.read_text())["runs"]
    fig = Figure(figsize=(10, 4))
    for i, (name, summary) in enumerate(sorted(panels.items(), reverse=True)):
        table = _table(summary)
        order = [v for v in LABELS.values() if v in table] + [k for k in table if k not in LABELS.values()]
        table = {k: table[k] for k in order}
        ax = fig.add_subplot(1, len(panels), i + 1)
        print(f"\n{name}\n")
        lrs = sorted({lr for t in table.values() for lr in t})
        print("| optimizer | " + " | ".join(f"{lr:g}" for lr in lrs) + " |")
        print("|---|" + "---|" * len(lrs))
        for label, t in table.items():
            xs = [lr for lr in lrs if t.get(lr, (None,))[0] is not None]
            ax.plot(xs, [t[lr][0] for lr in xs], marker="o", label=label)
            for lr in lrs:
                if lr in t and t[lr][1]:
                    ax.plot([lr], [ax.get_ylim()[1] if xs else 3.0], marker="x", color="red")
            cells = []
            for lr in lrs:
                mean, bad, n = t.get(lr, (None, 0, 0))
                cells.append(f"diverged ({bad}/{n})" if bad else (f"{mean:.4f}" if mean is not None and
                                                                   math.isfinite(mean) else "-"))
            print(f"| {label} | " + " | ".join(cells) + " |")
        ax.set_xscale("log")
        ax.set_xlabel("peak learning rate")
        ax.set_ylabel("final held-out loss (mean of seeds)")
        ax.set_title(name.replace("warmup", "warmup "), fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
