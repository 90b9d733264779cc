"""Summarise tinyshakespeare gap runs: best final held-out loss per optimizer variant
over its LR grid, state bytes, and the gap against the AdamW row of the same table.

Usage: python benchmarks/shakespeare_gap_table.py OUT_DIR [OUT_DIR ...] [--baseline KEY]
Reads OUT_DIR/runs/*/result.json (so it also works on a sweep still running).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def rows(dirs):
    best: dict[str, dict] = {}
    grid: dict[str, list] = {}
    for d in dirs:
        for f in sorted(Path(d).glob("runs/*/result.json")):
            r = json.loads(f.read_text())
            key = r["optimizer"]
            v = r.get("final_val_loss")
            grid.setdefault(key, []).append((r["lr"], v if not r.get("diverged") else float("nan")))
            if v is None or r.get("diverged"):
                continue
            if key not in best or v < best[key]["final_val_loss"]:
                best[key] = r
    return best, grid


def main(argv):
    base = "adamw"
    if "--baseline" in argv:
        i = argv.index("--baseline")
        base = argv[i + 1]
        del argv[i:i + 2]
    best, grid = rows(argv)
    ref = best.get(base)
    print("| optimizer | LR grid: final held-out loss | best LR | best held-out loss | gap vs "
          f"{base} | state bytes | state / {base} |")
    print("|---|---|---|---|---|---|---|")
    for key, r in best.items():
        g = ", ".join(f"{lr:g}: {v:.4f}" for lr, v in sorted(grid[key]))
        gap = f"{100 * (r['final_val_loss'] / ref['final_val_loss'] - 1):+.2f}%" if ref else "-"
        ratio = f"{r['state_bytes'] / ref['state_bytes']:.3f}" if ref else "-"
        print(f"| {key} | {g} | {r['lr']:g} | {r['final_val_loss']:.4f} | {gap} | {r['state_bytes']:,} | {ratio} |")


if __name__ == "__main__":
    main(sys.argv[1:])
