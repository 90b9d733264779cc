"""Where does Adam-mini's parity with AdamW hold? The held-out gap to AdamW of Adam-mini (official
rules), of AdamMini's default (the built-in SNR table, matrices factored, within a 0.55x state budget),
of the same without factoring (``adam-mini-default:rules=blocks``) and of Adam-mini
with blocks calibrated from data while holding AdamW's state for the window
(``adam-mini-snr:calibrate_state=adamw``), at three token budgets.

Adam-mini's paper reports parity at about 20 tokens per parameter; the default ``blockopt bench`` run is
0.75. This study trains ``llama-micro`` (164k parameters, bytes, the default corpus) at about 0.75, 3
and 12 tokens per parameter (60, 241 and 963 steps of 16 x 128 tokens; warmup 10 %, cosine to 0.1 x lr,
clip 1, wd 0.1, betas 0.9,0.95), each optimizer with its own lr grid (3e-3, 6e-3, 1.2e-2) and seeds 0
and 1, compared at the end of training: the best lr by mean final held-out loss, then the mean over
seeds of the per-seed gap to AdamW at its best lr. Losses are deterministic for a given --threads.

    python benchmarks/token_budget.py                 # all optimizers, ~55 min on 2 cores
    python benchmarks/token_budget.py --optimizers adam-mini-default --tag default   # one more, ~15 min
    python benchmarks/token_budget.py --report-only   # table and plot from the kept summaries

Each run's summaries are kept in ``benchmarks/results/token_budget/tpp-<budget>[-<tag>].summary.json``;
the report merges every kept summary of a budget.

Writes ``benchmarks/results/token_budget.json``, ``.md`` and ``docs/token_budget.png``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODEL, PARAMS = "llama-micro", 164_288
TOKENS_PER_STEP = 16 * 128
BUDGETS = (0.75, 3.0, 12.0)  # tokens per parameter
OPTIMIZERS = ("adamw", "adam-mini", "adam-mini-default", "adam-mini-default:rules=blocks",
              "adam-mini-snr:calibrate_state=adamw")
LABELS = {"adam-mini": ("Adam-mini (official rules)", "tab:orange"),
          "adam-mini-default": ("AdamMini default (SNR table, matrices factored, budget 0.55)", "tab:blue"),
          "adam-mini-default:rules=blocks": ("AdamMini(rules='blocks') (the same, blocks only)", "tab:purple"),
          "adam-mini-snr:calibrate_state=adamw": ("Adam-mini, SNR blocks (AdamW's state in the window)", "tab:green")}
LRS = "3e-3,6e-3,1.2e-2"
SEEDS = "0,1"


def steps_for(tpp: float) -> int:
    return round(tpp * PARAMS / TOKENS_PER_STEP)


KEEP = ROOT / "benchmarks" / "results" / "token_budget"


def run(out: Path, threads: int, optimizers: tuple[str, ...], tag: str) -> None:
    KEEP.mkdir(parents=True, exist_ok=True)
    suffix = f"-{tag}" if tag else ""
    for tpp in BUDGETS:
        dest = out / f"tpp-{tpp:g}{suffix}"
        cmd = ["blockopt", "bench", "--model", MODEL, "--steps", str(steps_for(tpp)), "--optimizers",
               ",".join(optimizers), "--lrs", LRS, "--seeds", SEEDS, "--threads", str(threads), "--no-plots",
               "--progress", "plain", "--checkpoint-every", "0", "--out", str(dest)]
        print("$", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, cwd=ROOT)
        summary = json.loads((dest / "summary.json").read_text())
        (KEEP / f"tpp-{tpp:g}{suffix}.summary.json").write_text(json.dumps(summary, indent=1))


def merged(tpp: float) -> dict:
    """Every kept summary of budget ``tpp``, their runs together (the environment of the last)."""
    out: dict = {"runs": []}
    for f in sorted(KEEP.glob(f"tpp-{tpp:g}*.summary.json")):
        s = json.loads(f.read_text())
        out = {**s, "runs": out["runs"] + s["runs"]}
    return out


def best_by_optimizer(summary: dict) -> dict[str, dict]:
    """Per optimizer: the lr with the lowest mean final held-out loss over seeds, and its per-seed losses."""
    out = {}
    for opt in OPTIMIZERS:
        runs = [r for r in summary["runs"] if r["optimizer"] == opt and r.get("final_val_loss") is not None]
        if not runs:
            continue
        by_lr: dict[float, dict[int, float]] = {}
        for r in runs:
            by_lr.setdefault(r["lr"], {})[r["seed"]] = r["final_val_loss"]
        full = {lr: s for lr, s in by_lr.items() if len(s) == len(SEEDS.split(","))}
        lr = min(full, key=lambda x: sum(full[x].values()))
        out[opt] = {"lr": lr, "per_seed": full[lr], "mean": sum(full[lr].values()) / len(full[lr]),
                    "edge": lr in (min(by_lr), max(by_lr))}
    return out


def report() -> dict:
    rows = []
    for tpp in BUDGETS:
        summary = merged(tpp)
        best = best_by_optimizer(summary)
        ref = best["adamw"]["per_seed"]
        row = {"tokens_per_param": tpp, "steps": steps_for(tpp), "tokens": steps_for(tpp) * TOKENS_PER_STEP,
               "best": best}
        for opt in [o for o in OPTIMIZERS[1:] if o in best]:
            gaps = [100 * (best[opt]["per_seed"][s] / ref[s] - 1) for s in ref]
            row[f"gap_{opt}"] = sum(gaps) / len(gaps)
            row[f"gaps_{opt}"] = gaps
        rows.append(row)
    env = summary["environment"]
    result = {"model": MODEL, "params": PARAMS, "seeds": SEEDS, "lrs": LRS, "rows": rows,
              "machine": f"{env.get('cpus', '?')} cores ({env.get('threads', '?')} thread per run), torch {env.get('torch')}",
              "command": "python benchmarks/token_budget.py"}
    res = ROOT / "benchmarks" / "results"
    res.mkdir(parents=True, exist_ok=True)
    (res / "token_budget.json").write_text(json.dumps(result, indent=1))
    shown = [o for o in OPTIMIZERS[1:] if all(o in r["best"] for r in rows)]
    lines = [(f"Held-out gap to AdamW, {MODEL} ({PARAMS:,} parameters), mean over seeds {SEEDS} of per-seed "
             f"gaps, each optimizer at its best lr of {LRS}; `python benchmarks/token_budget.py`, "
             f"{result['machine']}."), "",
             "| tokens / parameter | steps | AdamW (lr) | " + " | ".join(f"{LABELS[o][0]} (lr) | gap" for o in shown)
             + " |", "|---|---|---|" + "---|---|" * len(shown)]

    def lr(b):
        return f"{b['lr']:g}{', edge' if b['edge'] else ''}"

    for r in rows:
        b = r["best"]
        cells = [f"{b[o]['mean']:.4f} ({lr(b[o])}) | {r[f'gap_{o}']:+.2f} %" if o in b else "| " for o in shown]
        lines.append(f"| {r['tokens_per_param']:g} | {r['steps']} | {b['adamw']['mean']:.4f} ({lr(b['adamw'])}) | "
                     + " | ".join(cells) + " |")
    if any(b["edge"] for r in rows for b in r["best"].values()):
        lines += ["", "*edge*: the best lr is at the edge of the grid; the optimum may lie outside it."]
    (res / "token_budget.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no plot: pip install 'blockopt[bench]'", file=sys.stderr)
        return result
    fig, ax = plt.subplots(figsize=(6, 3.6))
    x = [r["tokens_per_param"] for r in rows]
    for opt in shown:
        label, color = LABELS[opt]
        ax.plot(x, [r[f"gap_{opt}"] for r in rows], "o-", color=color, label=label)
        for r in rows:
            ax.scatter([r["tokens_per_param"]] * len(r[f"gaps_{opt}"]), r[f"gaps_{opt}"], color=color, alpha=0.35,
                       s=12)
    ax.axhline(0, color="black", lw=0.8)
    ax.axhspan(-1, 1, color="grey", alpha=0.12, lw=0, label="within 1 % of AdamW")
    ax.set_xscale("log")
    ax.set_xticks(x, [f"{v:g}" for v in x])
    ax.set_xlabel("training tokens per parameter")
    ax.set_ylabel("held-out loss vs AdamW (%)")
    ax.set_title(f"{MODEL}: gap to AdamW by token budget (seeds {SEEDS})", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    (ROOT / "docs").mkdir(exist_ok=True)
    fig.savefig(ROOT / "docs" / "token_budget.png", dpi=120)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "runs" / "token-budget"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--optimizers", default=",".join(OPTIMIZERS), help="a subset to run (default: all)")
    ap.add_argument("--tag", default="", help="suffix of the kept summaries of this run")
    args = ap.parse_args()
    if not args.report_only:
        run(Path(args.out), args.threads, tuple(args.optimizers.split(",")), args.tag)
    report()


if __name__ == "__main__":
    main()
