"""Markdown table of ``blockopt memory --json`` records (one per line), for README and docs/results.md.

    blockopt memory --model llama-300m --setups adamw,...,lean --json > runs/mem300.json
    python benchmarks/memory_table.py runs/mem300.json
"""

from __future__ import annotations

import json
import sys

MIB = 1 << 20


def main() -> None:
    with open(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/memory/llama-300m.json") as f:
        records = [json.loads(line) for line in f if line.startswith("{")]
    ref = next((r for r in records if r["setup"] == "adamw" and r.get("peak_rss")), None)
    print("| setup | weights | grads | state | bytes / param (w+g+s) | peak RSS above idle | vs AdamW |")
    print("|---|---|---|---|---|---|---|")
    for r in records:
        if r.get("error"):
            print(f"| {r['setup']} | not run: {r['error'].splitlines()[0][:90]} | | | | | |")
            continue
        ratio = f"{r['peak_rss'] / ref['peak_rss']:.2f}x" if ref else ""
        print(f"| {r['setup']} | {r['weights'] / MIB:,.0f} MiB | {r['grads'] / MIB:,.0f} MiB | "
              f"{r['state'] / MIB:,.0f} MiB | {r['bytes_per_param']:.2f} | {r['peak_rss'] / MIB:,.0f} MiB | {ratio} |")


if __name__ == "__main__":
    main()
