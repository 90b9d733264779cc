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

Prints a table and writes JSON to ``--out`` (default
``benchmarks/results/finetune_forgetting.json``).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
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
LABELS = {"adamw": "AdamW", "adam-mini": "Adam-mini", "mofo": "MoFO", "mofo-block": "MoFO (block v)"}
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
    return args


def make_model(args: argparse.Namespace) -> torch.nn.Module:
    if args.tiny:
        return build_model(args.model, vocab_size=256, seed=args.seed, d_model=32, n_layers=1, n_heads=4,
                           n_kv_heads=2, max_seq_len=64)
    return build_model(args.model, vocab_size=256, seed=args.seed)


def make_optimizer(name: str, model: torch.nn.Module, lr: float, args: argparse.Namespace):
    kw = {"lr": lr, "betas": (0.9, 0.95), "weight_decay": args.finetune_weight_decay}
    plan = blockopt.partition(model, warn=False)
    if name == "adamw":
        decay = [p for n, p in model.named_parameters() if plan[n].weight_decay]
        rest = [p for n, p in model.named_parameters() if not plan[n].weight_decay]
        return torch.optim.AdamW([{"params": decay}, {"params": rest, "weight_decay": 0.0}], **kw)
    if name == "adam-mini":
        return blockopt.AdamMini(model, plan=plan, **kw)  # the default step (the fused CPU kernel)
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
        "command": "python benchmarks/finetune_forgetting.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "config": {k: v for k, v in vars(args).items() if k not in ("lr_table",)} | {"lrs": args.lr_table},
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
