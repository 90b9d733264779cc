"""Tables for benchmarks/snr_quality.sh: per setting, each optimizer at its best lr (lowest mean over seeds
of the final held-out loss, the metric by which ``blockopt bench`` picks its winners), the per-seed
losses, and the gap to AdamW (mean of per-seed gaps).

    python benchmarks/snr_quality_table.py [runs/snr-quality]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

SETTINGS = (("llama-stdlib", "llama-tiny, default corpus (standard library)"),
            ("llama-shakespeare", "llama-tiny, tinyshakespeare"),
            ("gpt2-stdlib", "gpt2-tiny, default corpus (standard library)"))
LABELS = {"adamw": "AdamW", "adam-mini": "Adam-mini (official rules)", "adam-mini-snr": "Adam-mini, SNR blocks",
          "adam-mini-snr+blr": "Adam-mini, SNR blocks + BLR"}


def best(summary: dict, opt: str, key: str = "final_val_loss") -> dict | None:
    by_lr: dict[float, dict[int, float]] = {}
    seeds = set(summary["protocol"]["seeds"])
    for r in summary["runs"]:
        if r["optimizer"] == opt and r.get(key) is not None and r["status"] == "ok":
            by_lr.setdefault(r["lr"], {})[r["seed"]] = r[key]
    full = {lr: s for lr, s in by_lr.items() if set(s) == seeds}
    if not full:
        return None
    lr = min(full, key=lambda x: sum(full[x].values()))
    grid = sorted(by_lr)
    return {"lr": lr, "per_seed": full[lr], "mean": sum(full[lr].values()) / len(full[lr]), "grid": grid,
            "edge": lr in (grid[0], grid[-1]) and len(grid) > 1,
            "state_bytes": next(r["state_bytes"] for r in summary["runs"]
                                if r["optimizer"] == opt and r["lr"] == lr and r["seed"] == min(seeds))}


def table(summary: dict, title: str) -> list[str]:
    seeds = sorted(summary["protocol"]["seeds"])
    ref = best(summary, "adamw")
    env = summary["environment"]
    lines = [(f"**{title}** ({summary['model']['name']}, {summary['protocol']['steps']} steps; "
             f"{env.get('cpus', '?')} cores, {env.get('threads', '?')} thread(s) per run, torch {env.get('torch', '?')})"), "",
             "| optimizer | best lr (grid) | " + " | ".join(f"seed {s}" for s in seeds)
             + " | mean | gap to AdamW | state vs AdamW |",
             "|---|---|" + "---|" * len(seeds) + "---|---|---|"]
    for opt in summary["protocol"]["lr_grids"]:
        b = best(summary, opt)
        if b is None:
            continue
        gaps = [100 * (b["per_seed"][s] / ref["per_seed"][s] - 1) for s in seeds]
        gap = "" if opt == "adamw" else f"{sum(gaps) / len(gaps):+.2f} % ({', '.join(f'{g:+.1f}' for g in gaps)})"
        grid = ", ".join(f"{x:g}" for x in b["grid"])
        lines.append(f"| {LABELS.get(opt, opt)} | {b['lr']:g}{' (edge)' if b['edge'] else ''} ({grid}) | "
                     + " | ".join(f"{b['per_seed'][s]:.4f}" for s in seeds)
                     + f" | {b['mean']:.4f} | {gap} | {b['state_bytes'] / ref['state_bytes']:.2f}x |")
    return lines


def main() -> None:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/snr-quality")
    out = [("Final held-out loss (after the last step), each optimizer at the lr of its grid with the lowest "
           "mean over seeds (as `blockopt bench` picks its winners); gap: mean of the per-seed gaps to AdamW at its best lr (per seed in brackets). "
           "Command: `bash benchmarks/snr_quality.sh`."), ""]
    for name, title in SETTINGS:
        path = root / name / "summary.json"
        if not path.is_file():
            out += [f"**{title}**: not run ({path} missing)", ""]
            continue
        out += table(json.loads(path.read_text()), title) + [""]
    print("\n".join(out))


if __name__ == "__main__":
    main()
