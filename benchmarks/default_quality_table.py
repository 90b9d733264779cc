"""Tables for benchmarks/default_quality.sh: per setting, each optimizer at its best lr (lowest mean over
seeds of the final held-out loss, the rule by which ``blockopt bench`` picks winners), the per-seed
losses, the gap to AdamW (mean of per-seed gaps to AdamW at its own best lr) and the optimizer state at
its peak over the run against AdamW's.

    python benchmarks/default_quality_table.py [benchmarks/results/default_quality]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

SETTINGS = (("A", "llama-tiny, default corpus, 300 steps"),
            ("B", "llama-tiny, tinyshakespeare, 300 steps"),
            ("C", "gpt2-tiny, default corpus, 300 steps"),
            ("D", "llama-tiny, default corpus, 1,200 steps (lr 3e-3 only)"))
LABELS = {"adamw": "AdamW", "adam-mini": "Adam-mini (official rules)",
          "adam-mini-default": "**AdamMini default** (built-in SNR table, matrices factored, budget 0.55)",
          "adam-mini-default:rules=blocks": "AdamMini(rules='blocks') (the same, blocks only)",
          "adam-mini-snr": "Adam-mini, SNR blocks calibrated inside the budget"}


def load(res: Path, setting: str) -> list[dict]:
    runs, seeds = [], set()
    for f in sorted(res.glob(f"{setting}*.summary.json")):
        s = json.loads(f.read_text())
        seeds |= set(s["protocol"]["seeds"])
        runs += [r for r in s["runs"] if r["status"] == "ok" and r.get("final_val_loss") is not None]
    return runs


def best(runs: list[dict], opt: str) -> tuple[float, dict[int, dict], bool] | None:
    by_lr: dict[float, dict[int, dict]] = {}
    for r in runs:
        if r["optimizer"] == opt:
            by_lr.setdefault(r["lr"], {})[r["seed"]] = r
    seeds = {r["seed"] for r in runs}
    full = {lr: s for lr, s in by_lr.items() if set(s) == seeds}
    if not full:
        return None
    lr = min(full, key=lambda x: sum(r["final_val_loss"] for r in full[x].values()))
    grid = sorted(full)
    return lr, full[lr], len(grid) > 1 and lr in (grid[0], grid[-1])


def table(res: Path, setting: str, title: str) -> list[str]:
    runs = load(res, setting)
    if not runs:
        return [f"### {title}", "", "(no finished runs)", ""]
    ref = best(runs, "adamw")
    opts = [o for o in LABELS if any(r["optimizer"] == o for r in runs)]
    seeds = sorted({r["seed"] for r in runs})
    header = (f"| optimizer | best lr | final held-out loss, seeds {' / '.join(map(str, seeds))} | mean | "
              "gap to AdamW | state, peak vs AdamW |")
    out = [f"### {title}", "", header, "|---|---|---|---|---|---|"]
    for opt in opts:
        b = best(runs, opt)
        if b is None:
            out.append(f"| {LABELS[opt]} | (incomplete) | | | | |")
            continue
        lr, by_seed, edge = b
        losses = [by_seed[s]["final_val_loss"] for s in seeds]
        mean = sum(losses) / len(losses)
        gap = ""
        if ref is not None and opt != "adamw":
            gaps = [(by_seed[s]["final_val_loss"] / ref[1][s]["final_val_loss"] - 1) * 100 for s in seeds]
            gap = f"{sum(gaps) / len(gaps):+.2f} %"
        peak = max(r["peak_state_bytes"] for r in runs if r["optimizer"] == opt)
        adamw_peak = max((r["peak_state_bytes"] for r in runs if r["optimizer"] == "adamw"), default=None)
        ratio = f"{peak / adamw_peak:.3f}x" if adamw_peak else ""
        out.append(f"| {LABELS[opt]} | {lr:g}{' (edge)' if edge else ''} | "
                   f"{' / '.join(f'{x:.4f}' for x in losses)} | {mean:.4f} | {gap} | {ratio} |")
    return [*out, ""]


def main() -> None:
    res = Path(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/default_quality")
    lines = []
    for setting, title in SETTINGS:
        lines += table(res, setting, title)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
