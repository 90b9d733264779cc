"""Fine-tuning and forgetting: AdamW, Adam-mini and MoFO fine-tune one pre-trained model.

Pretrain ``llama-tiny`` (byte tokens) on corpus A, then fine-tune copies of it on
corpus B with each optimizer, under one protocol: the same pre-trained weights,
the same fine-tuning batches in the same order, the same warmup + cosine
schedule, steps and gradient clipping; each optimizer has its own peak learning
rate. Held-out loss on A after fine-tuning measures forgetting, held-out loss
on B measures learning.

Defaults: A = the Python standard library's sources (blockopt's default bench
corpus), B = ``../shared/data/tinyshakespeare.txt`` (relative to the repository).

    nice -n 10 python benchmarks/finetune_forgetting.py              # the table in docs/results.md
    python benchmarks/finetune_forgetting.py --sweep 1e-3,3e-3,1e-2   # every optimizer at every lr,
                                                                     # each row the lr best on B
    python benchmarks/finetune_forgetting.py --tiny                  # a few seconds (the test)

At equal quality (``--seeds 0,1,2 --sweep ... --optimizers adamw,adam-mini,mofo``): for each seed (its
own pre-training), every optimizer fine-tunes at every lr of the sweep. The target on B is the worst of
the optimizers' best held-out losses on B, a loss every optimizer reaches at some lr. Each optimizer's
held-out loss on A at that target is interpolated along its lr sweep (between the two lrs, on the low-lr
side of its best, whose losses on B bracket the target) and compared: the forgetting at matched
learning. ``benchmarks/mofo_matched.sh`` is the command of docs/findings.md.

Prints a table and writes JSON to ``--out`` (default
``benchmarks/results/finetune_forgetting.json``).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import itertools
import json
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

import blockopt
from blockopt.bench.data import default_cache_dir, eval_windows, get_batch, load_corpus, resolve_source, train_batches
from blockopt.bench.runner import lr_at
from blockopt.models import build_model

REPO = Path(__file__).resolve().parent.parent
OPTIMIZERS = ("adamw", "adam-mini", "mofo", "mofo-block")
LABELS = {"adamw": "AdamW", "adam-mini": "AdamMini default", "mofo": "MoFO", "mofo-block": "MoFO (block v)"}
#: fine-tuning peak learning rates, one per optimizer. Not tuned: one third of the pretraining peak
#: (3e-3, the bench's best for llama-tiny) for every optimizer, the same for MoFO as for the full
#: fine-tuning baselines; `--sweep` tunes them (each row then shows the lr best on B's held-out loss)
DEFAULT_LRS = {"adamw": 1e-3, "adam-mini": 1e-3, "mofo": 1e-3, "mofo-block": 1e-3}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-a", default=None, help="pretraining corpus (default: the Python stdlib sources)")
    ap.add_argument("--data-b", default=str(REPO.parent / "shared" / "data" / "tinyshakespeare.txt"),
                    help="fine-tuning corpus (default: ../shared/data/tinyshakespeare.txt)")
    ap.add_argument("--model", default="llama-tiny")
    ap.add_argument("--pretrain-steps", type=int, default=300)
    ap.add_argument("--pretrain-lr", type=float, default=3e-3)
    ap.add_argument("--finetune-steps", type=int, default=150)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--warmup", type=float, default=0.1, help="warmup, as a share of each phase's steps")
    ap.add_argument("--min-lr-ratio", type=float, default=0.1)
    ap.add_argument("--fraction", type=float, default=0.1, help="MoFO's share of entries moved per step")
    ap.add_argument("--finetune-weight-decay", type=float, default=0.0)
    ap.add_argument("--eval-windows", type=int, default=64, help="held-out windows per corpus")
    ap.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    ap.add_argument("--lrs", default=None, help="fine-tuning lr per optimizer, e.g. 'adamw=1e-3,mofo=3e-3'")
    ap.add_argument("--sweep", default=None, help="comma-separated lrs tried for every optimizer")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seeds", default=None, help="comma-separated seeds (each pre-trains its own model); "
                    "with --sweep the matched table is printed")
    ap.add_argument("--tiny", action="store_true", help="a tiny model and a few steps (seconds; for the test)")
    ap.add_argument("--cache-dir", default=None, help="token streams and the pre-trained weights are cached here")
    ap.add_argument("--no-cache", action="store_true", help="pretrain again even if cached weights exist")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "finetune_forgetting.json"))
    args = ap.parse_args(argv)
    if args.tiny:
        args.pretrain_steps, args.finetune_steps = 6, 4
        args.batch_size, args.context, args.eval_windows = 2, 32, 4
    args.optimizers = [o.strip() for o in args.optimizers.split(",") if o.strip()]
    for o in args.optimizers:
        if o not in OPTIMIZERS:
            ap.error(f"--optimizers: {o!r}; allowed: {', '.join(OPTIMIZERS)}")
    lrs = dict(DEFAULT_LRS)
    if args.lrs:
        for part in args.lrs.split(","):
            name, _, value = part.partition("=")
            if name not in OPTIMIZERS or not value:
                ap.error(f"--lrs: {part!r}; expected NAME=LR with NAME in {', '.join(OPTIMIZERS)}")
            lrs[name] = float(value)
    args.lr_table = lrs
    args.sweep = [float(x) for x in args.sweep.split(",")] if args.sweep else None
    args.seeds = [int(x) for x in args.seeds.split(",")] if args.seeds else [args.seed]
    return args


def make_model(args: argparse.Namespace) -> torch.nn.Module:
    if args.tiny:
        return build_model(args.model, vocab_size=256, seed=args.seed, d_model=32, n_layers=1, n_heads=4,
                           n_kv_heads=2, max_seq_len=64)
    return build_model(args.model, vocab_size=256, seed=args.seed)


def at_target(points: list[tuple[float, float, float]], target: float) -> float | None:
    """``points``: (lr, loss_B, loss_A) of one optimizer's sweep. Its loss on A where its loss on B equals
    ``target``, linearly between the two lrs that bracket it on the low-lr side of its best lr (or the
    best point itself when that is the target); None when no two lrs bracket it there."""
    pts = sorted(p for p in points if math.isfinite(p[1]) and math.isfinite(p[2]))
    if not pts:
        return None
    best = min(range(len(pts)), key=lambda i: pts[i][1])
    if pts[best][1] == target:
        return pts[best][2]
    for (_, b0, a0), (_, b1, a1) in itertools.pairwise(pts[:best + 1]):
        if b1 <= target <= b0 and b0 != b1:
            return a0 + (a1 - a0) * (b0 - target) / (b0 - b1)
    return None


def matched(seed_runs: dict[int, list[dict]], names: list[str]) -> dict:
    """Per seed: the target on B (the worst of the optimizers' best) and each optimizer's loss on A there."""
    out = {}
    for seed, runs in seed_runs.items():
        pts = {n: [(r["lr"], r["loss_B"], r["loss_A"]) for r in runs if r["optimizer"] == n] for n in names}
        best = {n: min((b for _, b, _ in p if math.isfinite(b)), default=math.inf) for n, p in pts.items()}
        target = max(best.values())
        out[seed] = {"target_B": target, "loss_A": {n: at_target(p, target) for n, p in pts.items()}}
    return out


def make_optimizer(name: str, model: torch.nn.Module, lr: float, args: argparse.Namespace):
    kw = {"lr": lr, "betas": (0.9, 0.95), "weight_decay": args.finetune_weight_decay}
    plan = blockopt.partition(model, warn=False)
    if name == "adamw":
        decay = [p for n, p in model.named_parameters() if plan[n].weight_decay]
        rest = [p for n, p in model.named_parameters() if not plan[n].weight_decay]
        return torch.optim.AdamW([{"params": decay}, {"params": rest, "weight_decay": 0.0}], **kw)
    if name == "adam-mini":
        return blockopt.AdamMini(model, **kw)  # the default: AdamMini(model)
    return blockopt.MoFO(model, plan=plan, fraction=args.fraction,
                         second_moment="block" if name == "mofo-block" else "element", **kw)


@torch.no_grad()
def evaluate(model: torch.nn.Module, tokens: np.ndarray, offsets: np.ndarray, args: argparse.Namespace) -> float:
    model.eval()
    total = 0.0
    for i in range(0, len(offsets), args.batch_size):
        x, y = get_batch(tokens, offsets[i:i + args.batch_size], args.context)
        total += model(x, y).item() * len(x)
    model.train()
    return total / len(offsets)


def train(model, opt, tokens: np.ndarray, steps: int, peak_lr: float, seed: int, args) -> float:
    """``steps`` updates with warmup + cosine; returns the mean training loss of the last 10 %."""
    offsets = train_batches(len(tokens), steps, args.batch_size, args.context, seed)
    warmup = max(1, round(args.warmup * steps))
    tail = []
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, peak_lr, steps, warmup, args.min_lr_ratio)
        x, y = get_batch(tokens, offsets[step], args.context)
        loss = model(x, y)
        if not math.isfinite(loss.item()):
            return float("nan")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step >= steps - max(1, steps // 10):
            tail.append(loss.item())
    return float(np.mean(tail))


def drift(model: torch.nn.Module, start: dict[str, torch.Tensor]) -> tuple[float, float]:
    """(||W - W0|| / ||W0|| over all weights, share of entries that differ from the pre-trained weights)."""
    diff2 = base2 = 0.0
    changed = total = 0
    for n, p in model.named_parameters():
        d = (p.detach() - start[n]).double()
        diff2 += float(d.square().sum())
        base2 += float(start[n].double().square().sum())
        changed += int((d != 0).sum())
        total += d.numel()
    return math.sqrt(diff2 / base2), changed / total


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    seeds, results = list(args.seeds), []
    for seed in seeds:
        args.seed = seed
        results.append(run_seed(args, argv))
    if len(seeds) == 1:
        return 0
    runs = {seed: r["runs"] for seed, r in zip(seeds, results)}
    m = matched(runs, args.optimizers)
    print(f"\nForgetting at matched learning ({len(seeds)} seeds): held-out loss on A where each optimizer's "
          "held-out loss on B equals the target (the worst of their best)")
    header = "| seed | target on B | " + " | ".join(f"{LABELS[n]}: loss A" for n in args.optimizers) + " |"
    print(header + "\n|" + "---|" * (2 + len(args.optimizers)))
    for seed in seeds:
        row = m[seed]
        cells = [f"{row['loss_A'][n]:.4f}" if row["loss_A"][n] is not None else "not bracketed" for n in args.optimizers]
        print(f"| {seed} | {row['target_B']:.4f} | " + " | ".join(cells) + " |")
    means = {}
    for n in args.optimizers:
        vals = [m[s]["loss_A"][n] for s in seeds]
        means[n] = sum(vals) / len(vals) if all(v is not None for v in vals) else None
    print("| mean | " + f"{sum(m[s]['target_B'] for s in seeds) / len(seeds):.4f} | " + " | ".join(
        f"{means[n]:.4f}" if means[n] is not None else "-" for n in args.optimizers) + " |")
    out = Path(args.out)
    out.write_text(json.dumps({"command": "python benchmarks/finetune_forgetting.py " + " ".join(
        argv if argv is not None else sys.argv[1:]), "seeds": seeds, "per_seed": results,
        "matched": {str(s): v for s, v in m.items()}, "matched_mean_loss_A": means}, indent=1) + "\n")
    return 0


def run_seed(args: argparse.Namespace, argv: list[str] | None) -> dict:
    torch.manual_seed(args.seed)
    t_start = time.perf_counter()
    cap = 400_000 if args.tiny else None
    corpora = {}
    for key, data in (("A", args.data_a), ("B", args.data_b)):
        corpora[key] = load_corpus(resolve_source(data, max_bytes=cap), tokenizer="byte", cache_dir=args.cache_dir)
    val_offsets = {k: eval_windows(len(c.val), args.eval_windows, args.context) for k, c in corpora.items()}

    def losses(model) -> dict[str, float]:
        return {k: evaluate(model, corpora[k].val, val_offsets[k], args) for k in corpora}

    # 1. pretrain on A (AdamW, the bench's best lr for llama-tiny); cached, keyed by everything it depends on
    model = make_model(args)
    key = hashlib.sha256(json.dumps([
        corpora["A"].source.key, args.model, args.tiny, args.pretrain_steps, args.pretrain_lr, args.batch_size,
        args.context, args.warmup, args.min_lr_ratio, args.seed, torch.__version__, 1]).encode()).hexdigest()[:16]
    ckpt = Path(args.cache_dir or default_cache_dir()) / "finetune_forgetting" / f"pretrained-{key}.pt"
    if ckpt.is_file() and not args.no_cache:
        saved = torch.load(ckpt, weights_only=True)
        model.load_state_dict(saved["model"])
        pretrain_s = float(saved["seconds"])
        print(f"pre-trained weights from {ckpt}", file=sys.stderr)
    else:
        t0 = time.perf_counter()
        plan = blockopt.partition(model, warn=False)
        decay = [p for n, p in model.named_parameters() if plan[n].weight_decay]
        rest = [p for n, p in model.named_parameters() if not plan[n].weight_decay]
        pre_opt = torch.optim.AdamW([{"params": decay}, {"params": rest, "weight_decay": 0.0}],
                                    lr=args.pretrain_lr, betas=(0.9, 0.95), weight_decay=0.1)
        train(model, pre_opt, corpora["A"].train, args.pretrain_steps, args.pretrain_lr, args.seed, args)
        pretrain_s = time.perf_counter() - t0
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        tmp = ckpt.with_suffix(".tmp")
        torch.save({"model": model.state_dict(), "seconds": pretrain_s}, tmp)
        tmp.replace(ckpt)
    before = losses(model)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    print(f"pre-trained on A (pretraining took {pretrain_s:.0f} s): held-out loss A {before['A']:.4f}, "
          f"B {before['B']:.4f}",
          file=sys.stderr)

    # 2. fine-tune a copy per (optimizer, lr) on B; the same batches (seed + 1) for all
    runs = []
    for name in args.optimizers:
        for lr in (args.sweep or [args.lr_table[name]]):
            ft = copy.deepcopy(model)
            opt = make_optimizer(name, ft, lr, args)
            t0 = time.perf_counter()
            train_loss = train(ft, opt, corpora["B"].train, args.finetune_steps, lr, args.seed + 1, args)
            secs = time.perf_counter() - t0
            after = losses(ft)
            rel, changed = drift(ft, start)
            runs.append({"optimizer": name, "label": LABELS[name], "lr": lr, "loss_A": after["A"],
                         "loss_B": after["B"], "train_loss_B": train_loss, "weight_drift": rel,
                         "changed_share": changed, "seconds": secs})
            print(f"{LABELS[name]:>15} lr {lr:g}: A {after['A']:.4f}  B {after['B']:.4f}  ({secs:.0f} s)",
                  file=sys.stderr)
    # one row per optimizer: its only run, or under --sweep the lr with the best held-out loss on B
    rows = []
    for name in args.optimizers:
        mine = [r for r in runs if r["optimizer"] == name]
        rows.append(min(mine, key=lambda r: r["loss_B"] if math.isfinite(r["loss_B"]) else math.inf))

    header = ["", "fine-tune lr", "loss A (forgetting)", "loss B (learning)", "weight drift", "entries changed"]
    table = [["pre-trained", "-", f"{before['A']:.4f}", f"{before['B']:.4f}", "0", "0 %"]]
    for r in rows:
        table.append([r["label"], f"{r['lr']:g}", f"{r['loss_A']:.4f} ({r['loss_A'] - before['A']:+.4f})",
                      f"{r['loss_B']:.4f} ({r['loss_B'] - before['B']:+.4f})", f"{r['weight_drift']:.4f}",
                      f"{100 * r['changed_share']:.1f} %"])
    widths = [max(len(row[i]) for row in [header] + table) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in [header] + table]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    total_s = time.perf_counter() - t_start
    print(f"{args.model}{' (tiny)' if args.tiny else ''}, pretrain {args.pretrain_steps} steps on A, fine-tune "
          f"{args.finetune_steps} steps on B, batch {args.batch_size} x {args.context} bytes, MoFO fraction "
          f"{args.fraction}, seed {args.seed}; {total_s:.0f} s")
    print("A = " + corpora["A"].source.description)
    print("B = " + corpora["B"].source.description)
    print("\n".join(lines))

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "seed": args.seed,
        "command": "python benchmarks/finetune_forgetting.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "config": {k: v for k, v in vars(args).items() if k not in ("lr_table", "seeds")} | {"lrs": args.lr_table},
        "corpora": {k: {"description": c.source.description, "train_tokens": int(c.train.size),
                        "val_tokens": int(c.val.size)} for k, c in corpora.items()},
        "pretrained": {"loss_A": before["A"], "loss_B": before["B"], "seconds": pretrain_s, "checkpoint": str(ckpt)},
        "rows": rows,
        "runs": runs,
        "seconds": total_s,
        "environment": {"torch": torch.__version__, "python": platform.python_version(),
                        "threads": torch.get_num_threads()},
    }
    out.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    sys.exit(main())
