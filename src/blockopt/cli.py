"""The ``blockopt`` command: ``blockopt bench`` (compare optimizers), ``blockopt plan``, ``blockopt calibrate``,
``blockopt hessian`` and ``blockopt memory`` (what one training step needs, per optimizer setup).

Exit status: 0 done; 1 some runs (or memory setups) failed (the others' results are written);
2 bad input (one line on stderr, nothing written); 130 interrupted (resume
with ``--resume``).
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
from collections.abc import Sequence
from typing import Any

__all__ = ["main"]

EXIT_OK, EXIT_FAILED_RUNS, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
DEFAULT_OPTIMIZERS = "adamw,adam-mini,adam-mini-default"  # what plain `blockopt bench` compares


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (``blockopt bench: error: ...``) and exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise _UsageError(f"{message} (see {self.prog} --help)")


BENCH_EPILOG = """\
learning rates (--lrs):
  1e-3,3e-3                        the same grid for every optimizer
  'adamw=1e-3,3e-3;adam-mini=2e-3,4e-3'
                                   a grid per optimizer (quote it: ';' ends a shell command)
  '1e-3,3e-3;adafactor=1e-2,3e-2'  a bare list for the optimizers not named
  (not given)                      each optimizer's default learning rate, no sweep
  The winner per optimizer is the learning rate with the lowest final held-out loss,
  averaged over --seeds; a learning rate where a seed diverged cannot win.

optimizers (--optimizers, comma separated; options as name:key=value:key=value):
{optimizers}
  e.g. --optimizers adamw,adam-mini,adam-mini:value_single_block=true,adamw:beta2=0.99

models (--model): {models}
  or --hf-config config.json / a folder / '{{"model_type": "llama", ...}}' (built from the
  config with transformers, never downloaded; the vocabulary is set from the tokenizer)

examples:
  blockopt bench                                   # {default_optimizers}: llama-tiny on this
                                                   # Python's stdlib sources, 300 steps, {default_lrs}, seed 0
                                                   # ({default_runs} runs; --dry-run lists them and estimates their
                                                   # time on this machine)
  blockopt bench --data shakespeare.txt --steps 600 --lrs 1e-3,2e-3,4e-3 --out runs/shakespeare
  blockopt bench --dry-run --optimizers adamw,adam-mini,muon --seeds 0,1
  blockopt bench --out runs/shakespeare --resume   # continue an interrupted sweep (same flags)
"""


def _bench_parser(sub: Any) -> argparse.ArgumentParser:
    from .bench.optimizers import REGISTRY
    from .models import MODEL_PRESETS

    opt_lines = []
    for s in REGISTRY.values():
        need = f" [needs blockopt[{s.extra}]]" if s.extra else ""
        opt_lines.append(f"  {s.name:<20} {s.description} (default lr {s.default_lr:g}){need}")
    default = _split(DEFAULT_OPTIMIZERS)
    lrs = sorted({REGISTRY[n].default_lr for n in default})
    epilog = BENCH_EPILOG.format(
        optimizers="\n".join(opt_lines), models=", ".join(MODEL_PRESETS),
        default_optimizers=", ".join(default[:-1]) + f" and {default[-1]}", default_runs=len(default),
        default_lrs=f"lr {lrs[0]:g}" if len(lrs) == 1 else "each one's default lr")
    p = sub.add_parser(
        "bench",
        help="compare optimizers by pretraining a small language model on text",
        description="Pretrain a small decoder-only language model with several optimizers under one protocol "
                    "(same init, data order, token budget, warmup+cosine schedule and clipping) and report "
                    "held-out loss, optimizer state, step time, throughput and memory.",
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g = p.add_argument_group("data")
    g.add_argument("--data", metavar="PATH", help="a text file, a folder, or a glob (default: this Python's "
                   "standard library sources, capped at 4 MiB)")
    g.add_argument("--max-data-bytes", type=int, metavar="N", help="read at most N bytes of the corpus")
    g.add_argument("--val-fraction", type=float, default=0.1, metavar="F", help="held-out share (default 0.1)")
    g.add_argument("--tokenizer", choices=("byte", "bpe"), default="byte",
                   help="byte (256 symbols, default) or a BPE trained on the corpus (cached)")
    g.add_argument("--vocab-size", type=int, metavar="N", help="BPE vocabulary size (default 4096)")
    g.add_argument("--cache-dir", metavar="DIR", help="token cache (default $BLOCKOPT_CACHE or ~/.cache/blockopt)")
    g = p.add_argument_group("model")
    g.add_argument("--model", metavar="NAME", help="built-in model (default llama-tiny)")
    g.add_argument("--hf-config", metavar="PATH_OR_JSON", help="a transformers causal-LM config instead")
    g = p.add_argument_group("optimizers")
    g.add_argument("--optimizers", default=DEFAULT_OPTIMIZERS, metavar="LIST",
                   help=f"comma separated (default {DEFAULT_OPTIMIZERS})")
    g.add_argument("--lrs", metavar="GRID", help="learning rates, see below")
    g.add_argument("--seeds", default="0", metavar="LIST", help="comma separated seeds (default 0)")
    g.add_argument("--betas", default="0.9,0.95", metavar="B1,B2", help="for Adam-type optimizers (default 0.9,0.95)")
    g.add_argument("--eps", type=float, default=1e-8, help="default 1e-8")
    g.add_argument("--weight-decay", type=float, default=0.1, metavar="WD", help="decoupled (default 0.1)")
    g = p.add_argument_group("budget and schedule (the same for every run)")
    g.add_argument("--steps", type=int, default=300, help="optimizer steps per run (default 300)")
    g.add_argument("--batch-size", type=int, default=16, metavar="B", help="sequences per step (default 16)")
    g.add_argument("--context", type=int, default=128, metavar="T", help="tokens per sequence (default 128)")
    g.add_argument("--warmup", type=int, metavar="STEPS", help="linear warmup steps (default 10%% of --steps)")
    g.add_argument("--min-lr-ratio", type=float, default=0.1, metavar="R",
                   help="cosine decays to R x lr (default 0.1)")
    g.add_argument("--grad-clip", type=float, default=1.0, metavar="NORM", help="0 disables (default 1.0)")
    g.add_argument("--eval-every", type=int, metavar="STEPS", help="held-out evaluation period (default steps/10)")
    g.add_argument("--eval-batches", type=int, default=8, metavar="N",
                   help="held-out windows = N x batch size (default 8)")
    g = p.add_argument_group("running")
    g.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    g.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="bfloat16 = autocast with fp32 weights (default float32)")
    g.add_argument("--threads", type=int, metavar="N", help="torch CPU threads (default: all available cores)")
    g.add_argument("--out", metavar="DIR", help="results folder (default runs/bench-<date>-<time>)")
    g.add_argument("--resume", action="store_true", help="continue the sweep in --out: finished runs are kept, "
                   "interrupted ones continue from their checkpoint")
    g.add_argument("--dry-run", action="store_true", help="print the runs and their estimated cost, run nothing")
    g.add_argument("--isolate", choices=("auto", "process", "none"), default="auto",
                   help="run each run in a fresh process (auto: on CPU, so peak RSS is per run)")
    g.add_argument("--checkpoint-every", type=int, metavar="STEPS", help="default steps/5; 0 never")
    g.add_argument("--parallel", choices=("none", "fsdp", "ddp", "tp", "fsdp+tp"), default="none",
                   help="parallel runs: FSDP2, DDP, tensor parallel (tp: q/k/v/gate/up column-wise, o/down "
                        "row-wise) or FSDP2 + TP on a 2-D mesh (TP degree 2); must run under torchrun, e.g. "
                        "`torchrun --nproc-per-node 2 $(which blockopt) bench --parallel fsdp ...`; --batch-size "
                        "is then the global batch, split across the data-parallel ranks (default none)")
    g.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    g.add_argument("--progress", choices=("auto", "plain", "none"), default="auto",
                   help="live display on stderr (auto: rich on a terminal)")
    g.add_argument("--json", action="store_true", help="print summary.json (or the dry-run plan) on stdout")
    g.add_argument("-v", "--verbose", action="store_true", help="log more")
    return p


def _model_source_args(p: argparse.ArgumentParser, *, required: bool, default_note: str = "") -> None:
    """``--model NAME`` or ``--hf-config PATH_OR_JSON`` (mutually exclusive)."""
    from .models import MODEL_PRESETS

    src = p.add_mutually_exclusive_group(required=required)
    src.add_argument("--model", metavar="NAME", help=f"built-in{default_note}: {', '.join(MODEL_PRESETS)}")
    src.add_argument("--hf-config", metavar="PATH_OR_JSON",
                     help="a transformers config.json, a folder holding one, or inline JSON with a model_type")


def _plan_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "plan",
        help="print the Adam-mini partition plan of a model",
        description="Build a model on the meta device (no memory, no download) and print how Adam-mini will "
                    "cut each parameter into second-moment blocks.",
    )
    _model_source_args(p, required=True)
    p.add_argument("--vocab-size", type=int, metavar="N", help="override the vocabulary size")
    p.add_argument("--value-single-block", action="store_true", help="one block for each value projection")
    p.add_argument("--json", action="store_true", help="print the plan as JSON (PartitionPlan.from_json reads it)")
    p.add_argument("--snr", metavar="FILE|builtin",
                   help="blocks from data: a calibration or rules file written by 'blockopt calibrate', or 'builtin'")
    p.add_argument("--snr-cutoff", type=float, default=1.0, metavar="X", help="SNR a candidate must exceed (default 1)")
    p.add_argument("--state-budget", type=float, metavar="X",
                   help="per-element second moments for the least constant tensors while the state stays at or "
                        "under X x AdamW's (AdamMini's default plan: --snr builtin --factored --state-budget 0.55)")
    p.add_argument("--factored", action="store_true",
                   help="one second moment per row and per column for every matrix but the embeddings (before the "
                        "budget)")
    return p


def _calibrate_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "calibrate",
        help="measure the SNR of Adam's second moment and print the plan it gives",
        description="Train a model briefly on real text, measure for every tensor the signal-to-noise ratio of "
                    "Adam's second moment along each candidate partition (rows, columns, heads, whole tensor), and "
                    "print the SNR table and the plan it gives (SlimAdam's rule: the best candidate above the "
                    "cutoff, else per element).",
    )
    _model_source_args(p, required=False, default_note=" (default llama-tiny)")
    p.add_argument("--data", metavar="PATH", help="text file or folder (default: the Python standard library)")
    p.add_argument("--steps", type=int, default=300, help="calibration steps (default 300)")
    p.add_argument("--points", type=int, default=4, help="measurements, spread over the second half (default 4)")
    p.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate (default 3e-3; use your run's)")
    p.add_argument("--batch-size", type=int, default=16, help="default 16")
    p.add_argument("--context", type=int, default=128, help="default 128")
    p.add_argument("--seed", type=int, default=0, help="default 0")
    p.add_argument("--cutoff", type=float, default=1.0, help="SNR a candidate must exceed (default 1)")
    p.add_argument("--sample", action="store_true",
                   help="bounded memory: train with AdamMini and estimate SNR on a random sample of blocks")
    p.add_argument("--out", metavar="FILE", help="write the calibration (JSON) here")
    p.add_argument("--rules-out", metavar="FILE", help="write the decisions as rules by role (JSON) here")
    p.add_argument("--cache-dir", metavar="DIR", help="token cache (default $BLOCKOPT_CACHE or ~/.cache/blockopt)")
    return p


MEMORY_EPILOG = """\
setups (--setups, comma separated):
  adamw                 torch.optim.AdamW(fused=True), fp32 weights
  adamw-autocast        the same, forward and loss under torch.autocast(bfloat16)
  adamw8bit-bnb         bitsandbytes.optim.AdamW8bit (pip install bitsandbytes)
  adamw8bit-torchao     torchao.optim.AdamW8bit (pip install torchao)
  adam-mini-official    the official adam_mini.Adam_mini [needs blockopt[official]]
  adam-mini             blockopt.AdamMini(model), with options after colons:
                          momentum=fp32|bf16|int8    the first moment's storage (momentum_dtype)
                          weights=fp32|bf16-sr|bf16+int8|bf16+int16
                                                     bf16 weights kept by the optimizer (+ remainder bits)
                          step_in_backward=true      blockopt.step_in_backward: each gradient freed in backward
  lean                  adam-mini:momentum=int8:weights=bf16-sr:step_in_backward=true

models (--model): {models}
  or a transformers config.json, a folder holding one, or inline JSON (built, never downloaded)

what is measured:
  Each setup runs in its own process: it builds the model (seed 0) and runs --steps training steps on
  random tokens. On CPU every live tensor storage is counted as ops make and free it; at the worst
  point (the largest total) the bytes are split into weights, grads, optimizer state, activations
  (tensors saved for backward) and other. bytes/param = (weights + grads + state) / parameters.
  peak RSS = the process's peak resident memory during the steps above its idle level (before the model
  is built, after the imports); with --allocator mmap (default) the C heap maps every allocation above
  128 KiB on its own, so the RSS follows the live tensors. On CUDA the peak is
  torch.cuda.max_memory_allocated() and the split is a best effort.

examples:
  blockopt memory --model llama-300m --setups adamw,adam-mini,lean
  blockopt memory --model llama-micro --setups adamw,adam-mini:step_in_backward=true --json
"""


def _memory_parser(sub: Any) -> argparse.ArgumentParser:
    from .models import MODEL_PRESETS

    p = sub.add_parser(
        "memory",
        help="measure the memory one training step needs, per optimizer setup",
        description="Run a few training steps of a model with several optimizer setups, each in its own process, "
                    "and report the live tensor bytes at the worst point of the step (weights, grads, optimizer "
                    "state, activations, other), bytes per parameter and the peak RSS.",
        epilog=MEMORY_EPILOG.format(models=", ".join(MODEL_PRESETS)),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", default="llama-300m", metavar="NAME_OR_PATH",
                   help="a built-in model or a transformers config (default llama-300m)")
    p.add_argument("--setups", default="adamw,adam-mini,lean", metavar="LIST",
                   help="comma separated (default adamw,adam-mini,lean)")
    p.add_argument("--batch", type=int, default=1, metavar="B", help="sequences per step (default 1)")
    p.add_argument("--seq", type=int, default=64, metavar="T", help="tokens per sequence (default 64)")
    p.add_argument("--steps", type=int, default=3, help="training steps per setup (default 3)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--allocator", choices=("mmap", "heap"), default="mmap",
                   help="each process's C heap: mmap (default: tensors above 128 KiB mapped and unmapped, so the "
                        "RSS follows the live tensors) or heap (glibc's default, which may keep freed tensors)")
    p.add_argument("--json", action="store_true", help="one JSON record per setup per line on stdout")
    return p


def _parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(prog="blockopt", description="Adam-mini and block-wise optimizers for PyTorch.")
    parser.add_argument("--version", action="version", version=f"blockopt {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{bench,plan,calibrate,hessian,memory}", parser_class=_Parser)
    _bench_parser(sub)
    _plan_parser(sub)
    _calibrate_parser(sub)
    from .hessian.cli import add_parser as _hessian_parser

    _hessian_parser(sub)
    _memory_parser(sub)
    return parser


# --- bench --------------------------------------------------------------------------------------
def _split(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


def _config(args: argparse.Namespace, argv: Sequence[str]):
    from .bench.errors import BenchInputError
    from .bench.runner import SweepConfig, parse_seeds

    try:
        b1, b2 = (float(x) for x in args.betas.split(","))
    except ValueError:
        raise BenchInputError(f"--betas: {args.betas!r}; expected two numbers, e.g. 0.9,0.95") from None
    optimizers = _split(args.optimizers)
    return SweepConfig(
        data=args.data, max_data_bytes=args.max_data_bytes, val_fraction=args.val_fraction,
        tokenizer=args.tokenizer, vocab_size=args.vocab_size, model=args.model, hf_config=args.hf_config,
        optimizers=optimizers, lrs=args.lrs, seeds=parse_seeds(args.seeds), steps=args.steps,
        batch_size=args.batch_size, context=args.context, warmup=args.warmup, min_lr_ratio=args.min_lr_ratio,
        grad_clip=args.grad_clip, beta1=b1, beta2=b2, eps=args.eps, weight_decay=args.weight_decay,
        eval_every=args.eval_every, eval_batches=args.eval_batches, device=args.device, dtype=args.dtype,
        out=args.out, cache_dir=args.cache_dir, threads=args.threads, isolate=args.isolate,
        checkpoint_every=args.checkpoint_every, resume=args.resume, plots=not args.no_plots, argv=tuple(argv),
        parallel=args.parallel,
    )


def _text_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()
    return "\n".join([line(header), line(["-" * w for w in widths]), *[line(r) for r in rows]])


def _print_table(header: Sequence[str], rows: Sequence[Sequence[str]], title: str) -> None:
    if sys.stdout.isatty():
        try:
            from rich.console import Console
            from rich.table import Table

            t = Table()
            for i, h in enumerate(header):
                t.add_column(h, justify="left" if i == 0 else "right")
            for r in rows:
                t.add_row(*r)
            console = Console()
            console.print(title, highlight=False)
            console.print(t)
            return
        except ImportError:
            pass
    print(title)
    print(_text_table(header, rows))


def _fmt_duration(s: float | None) -> str:
    if s is None:
        return "unknown"
    if s < 90:
        return f"{s:.0f} s"
    if s < 5400:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


def _dry_run(sweep: Any, as_json: bool) -> int:
    from .bench.metrics import fmt_bytes
    from .bench.runner import estimate_cost

    est = estimate_cost(sweep)
    cfg = sweep.config
    plan = {
        "sweep_id": sweep.sweep_id,
        "out": str(sweep.out),
        "out_state": sweep.out_state,
        "data": sweep.source.to_dict(),
        "tokenizer": cfg.tokenizer,
        "model": sweep.model.describe(),
        "protocol": {k: sweep.identity[k] for k in ("steps", "batch_size", "context", "warmup", "min_lr_ratio",
                                                    "grad_clip", "hyper", "eval_every", "lr_grids", "seeds")},
        "runs": [{"run_id": r.run_id, "optimizer": r.optimizer, "lr": r.lr, "seed": r.seed,
                  "status": "finished" if r.run_id in sweep.finished else
                  "resume from checkpoint" if r.run_id in sweep.partial else "to run"} for r in sweep.runs],
        "estimate": est,
    }
    if as_json:
        print(json.dumps(plan, indent=1))
        return EXIT_OK
    src = sweep.source
    print("blockopt bench --dry-run: nothing is run or written")
    print(f"data     {src.description}: {fmt_bytes(src.used_bytes)} used of {fmt_bytes(src.total_bytes)}; "
          f"{cfg.tokenizer} tokenizer (vocab {sweep.model.vocab_size:,})")
    print(f"model    {sweep.model.name}: {est['params']:,} parameters")
    print(f"budget   {cfg.steps} steps x {cfg.batch_size} x {cfg.context} tokens = {sweep.tokens_per_run:,} tokens "
          f"per run; warmup {sweep.warmup}, cosine to {cfg.min_lr_ratio:g} x lr, clip {cfg.grad_clip:g}")
    state = {"new": "new", "resume": "resume", "complete": "finished; --resume rewrites the report"}[sweep.out_state]
    print(f"out      {sweep.out} ({state})")
    rows = [[str(i + 1), r["run_id"], r["optimizer"], f"{r['lr']:.3g}", str(r["seed"]), r["status"]]
            for i, r in enumerate(plan["runs"])]
    print(_text_table(["#", "run", "optimizer", "lr", "seed", "status"], rows))
    if est["run_s"] is not None:
        print(f"estimate {est['runs_to_do']} runs x ~{_fmt_duration(est['run_s'])} = ~{_fmt_duration(est['total_s'])} "
              f"on {sweep.device} with {sweep.threads} threads (from timed steps on this machine); "
              f"{est['flops_per_run'] / 1e12:.2f} TFLOP per run (6 N D)")
    else:
        print(f"estimate {est['runs_to_do']} runs, {est['flops_per_run'] / 1e12:.2f} TFLOP per run (6 N D); "
              "time not measured for a model this large")
    print(f"state    fp32 AdamW {fmt_bytes(est['adamw_state_bytes'])}, Adam-mini "
          f"{fmt_bytes(est['adam_mini_state_bytes'])} (from the partition plan)")
    return EXIT_OK


def _resume_hint(argv: Sequence[str], out: str) -> str:
    args = list(argv)
    if "--out" not in args and not any(a.startswith("--out=") for a in args):
        args += ["--out", out]
    if "--resume" not in args:
        args.append("--resume")
    return "blockopt " + " ".join(shlex.quote(a) for a in args)


def _cmd_bench(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from .bench.errors import BenchInputError

    try:
        from .bench.progress import make_progress
        from .bench.report import results_table, side_by_side_table
        from .bench.runner import prepare_sweep, run_sweep
    except ImportError as e:  # numpy is not a torch dependency
        raise BenchInputError(f"blockopt bench needs the package {e.name!r}: pip install 'blockopt[bench]'") from None

    if args.parallel == "none":
        return _bench_body(args, argv, prepare_sweep, run_sweep, make_progress, results_table, side_by_side_table)
    from .distributed import launch

    try:
        ctx = launch.init_distributed(device=args.device)
    except (RuntimeError, ValueError) as e:
        raise BenchInputError(f"--parallel {args.parallel}: {e}") from None
    try:
        rc = _bench_body(args, argv, prepare_sweep, run_sweep, make_progress, results_table, side_by_side_table,
                         is_main=ctx.is_main)
        launch.barrier()  # rank 0 has written everything; nobody leaves before
        return rc
    except BenchInputError as e:
        if not ctx.is_main:  # every rank finds the same bad input: rank 0 alone says so
            raise SystemExit(EXIT_USAGE) from e
        raise
    finally:
        launch.cleanup()


def _bench_body(args: argparse.Namespace, argv: Sequence[str], prepare_sweep: Any, run_sweep: Any,
                make_progress: Any, results_table: Any, side_by_side_table: Any, is_main: bool = True) -> int:
    cfg = _config(args, argv)
    sweep = prepare_sweep(cfg)  # raises BenchInputError before anything is written
    if args.parallel != "none":
        from .distributed import launch

        launch.barrier()  # every rank has checked --out before rank 0 writes into it
    if args.dry_run:
        return _dry_run(sweep, args.json) if is_main else EXIT_OK
    mode = "none" if not is_main or (args.json and args.progress == "auto") else args.progress
    progress = make_progress(mode)
    try:
        with progress:
            summary = run_sweep(sweep, progress)
    except KeyboardInterrupt:
        if is_main:
            hint = (f"continue with: {_resume_hint(argv, str(sweep.out))}" if args.parallel == "none"
                    else "--parallel runs cannot be resumed; run again with a new --out")
            print(f"blockopt bench: interrupted; {hint}", file=sys.stderr)
        return EXIT_INTERRUPTED
    if not is_main:
        return EXIT_OK
    if args.json:
        print(json.dumps(summary, indent=1))
    else:
        header, rows = (side_by_side_table if len(summary["winners"]) <= 4 else results_table)(summary)
        env = summary["environment"]
        title = (f"{summary['model']['name']}, {summary['tokens_per_run']:,} tokens per run, "
                 f"{env['device']} ({env['threads']} threads), torch {env['torch']}")
        if env.get("parallel"):
            title += f", {env['parallel']} x {env['world_size']} ranks"
        _print_table(header, rows, title)
        loads = [r["kernel_load_s"] for r in summary["runs"] if r.get("kernel_load_s") is not None]
        if loads:
            print(f"fused CPU kernel: built or loaded before each run's clock, {max(loads):.1f} s at most "
                  f"(not counted in tokens/s)")
        print(f"report: {sweep.out / 'report.md'}")
    if not summary["complete"]:
        failed = [r["run_id"] for r in summary["runs"] if r.get("status") == "error"]
        print(f"blockopt bench: {len(failed)} run(s) failed: {', '.join(failed)}; retry them with: "
              f"{_resume_hint(argv, str(sweep.out))}", file=sys.stderr)
        return EXIT_FAILED_RUNS
    return EXIT_OK


# --- plan ---------------------------------------------------------------------------------------
def _cmd_plan(args: argparse.Namespace) -> int:
    from .bench.errors import BenchInputError
    from .partition import partition

    if args.vocab_size is not None and args.vocab_size <= 0:
        raise BenchInputError(f"--vocab-size: {args.vocab_size}; expected a positive integer")
    if args.hf_config is not None:
        from .bench.hf import build_hf_model, load_hf_config

        cfg = load_hf_config(args.hf_config, vocab_size=args.vocab_size)
        model = build_hf_model(cfg, device="meta", seed=None)
        name = f"hf:{cfg.model_type}"
    else:
        from .models import MODEL_PRESETS, build_model

        if args.model not in MODEL_PRESETS:
            raise BenchInputError(f"--model: unknown model {args.model!r}; available: {', '.join(MODEL_PRESETS)}")
        model = build_model(args.model, vocab_size=args.vocab_size, device="meta", seed=None)
        name = args.model
    snr = _load_snr(args.snr) if args.snr is not None else None
    try:
        plan = partition(model, warn=False, value_single_block=args.value_single_block, snr=snr, snr_cutoff=args.snr_cutoff,
                         state_budget=args.state_budget, factored=args.factored)
    except ValueError as e:
        if "state_budget" in str(e):
            raise BenchInputError(f"--state-budget {args.state_budget:g}: {e}") from None
        if snr is None:
            raise
        raise BenchInputError(f"--snr {args.snr}: {e}") from None
    if args.json:
        print(plan.to_json())
    else:
        n = sum(p.numel() for p in model.parameters())
        print(f"{name}: {n:,} parameters")
        print(plan)
    return EXIT_OK


def _load_snr(text: str) -> Any:
    """``--snr``: ``builtin``, or a calibration / rules JSON file (which one is read from its content)."""
    from .bench.errors import BenchInputError
    from .partition.snr import load_snr

    if text == "builtin":
        return "builtin"
    try:
        return load_snr(text, argument="--snr")
    except ValueError as e:
        raise BenchInputError(str(e).removeprefix("Invalid ")) from None


def _cmd_calibrate(args: argparse.Namespace) -> int:
    import copy

    import torch

    from .bench.data import get_batch, load_corpus, resolve_source, train_batches
    from .bench.errors import BenchInputError
    from .optim.calibrate import calibrate
    from .partition import partition
    from .partition.snr import SNRRules, check_cutoff

    for name in ("steps", "points", "batch_size", "context"):
        if getattr(args, name) <= 0:
            raise BenchInputError(f"--{name.replace('_', '-')}: {getattr(args, name)}; expected a positive integer")
    if args.points > args.steps:
        raise BenchInputError(f"--points: {args.points}; expected at most --steps ({args.steps})")
    if not (args.lr > 0 and args.lr < float("inf")):
        raise BenchInputError(f"--lr: {args.lr}; expected a positive number")
    try:
        cutoff = check_cutoff(args.cutoff)
    except ValueError as e:
        raise BenchInputError(f"--cutoff: {e}") from None
    corpus = load_corpus(resolve_source(args.data), cache_dir=args.cache_dir)
    if args.hf_config is not None:
        from .bench.hf import build_hf_model, load_hf_config

        cfg = load_hf_config(args.hf_config, vocab_size=256)
        model = build_hf_model(cfg, device="cpu", seed=args.seed)
        name = f"hf:{cfg.model_type}"

        def loss_fn(m, batch):
            x, y = batch
            logits = m(input_ids=x).logits
            return torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1))
    else:
        from .models import MODEL_PRESETS, build_model

        name = args.model or "llama-tiny"
        if name not in MODEL_PRESETS:
            raise BenchInputError(f"--model: unknown model {name!r}; available: {', '.join(MODEL_PRESETS)}")
        model = build_model(name, vocab_size=256, seed=args.seed)

        def loss_fn(m, batch):
            return m(*batch)
    offsets = train_batches(len(corpus.train), args.steps, args.batch_size, args.context, args.seed)
    batches = (get_batch(corpus.train, o, args.context) for o in offsets)
    plan = partition(model, warn=False)
    calib = calibrate(copy.deepcopy(model), batches, loss_fn, steps=args.steps, lr=args.lr, points=args.points,
                      plan=plan, sample=args.sample, seed=args.seed)
    calib.source.update(model=name)
    print(f"{name}: SNR of Adam's second moment ({calib.source['method']}), {args.steps} steps at lr {args.lr:g}, "
          f"measured at steps {calib.steps}")
    print(calib.table(cutoff=cutoff))
    print()
    print(partition(model, warn=False, snr=calib, snr_cutoff=cutoff))
    if args.out:
        calib.save(args.out)
        print(f"calibration: {args.out}")
    if args.rules_out:
        SNRRules.from_calibration(plan, calib, cutoff).save(args.rules_out)
        print(f"rules: {args.rules_out}")
    return EXIT_OK


# --- memory -------------------------------------------------------------------------------------
def _cmd_memory(args: argparse.Namespace) -> int:
    from .memory import check_inputs, describe_model, measure
    from .memory.report import table
    from .utils import fmt_bytes

    kw = {"batch": args.batch, "seq": args.seq, "steps": args.steps, "device": args.device}
    setups, _ = check_inputs(args.model, args.setups, **kw)  # BenchInputError before anything runs
    info = describe_model(args.model)
    head = f"{args.model}: {info['params']:,} parameters"
    if info["adamw_state_bytes"] is not None:
        head += (f"; planned optimizer state: AdamW {fmt_bytes(info['adamw_state_bytes'])}, AdamMini "
                 f"{fmt_bytes(info['adam_mini_state_bytes'])} (int8 momentum "
                 f"{fmt_bytes(info['adam_mini_int8_state_bytes'])})")
    print(head, file=sys.stderr if args.json else sys.stdout, flush=True)

    def on_record(rec: dict[str, Any]) -> None:
        if args.json:
            print(json.dumps(rec), flush=True)
        else:
            print(f"  {rec['setup']}: {'error' if rec.get('error') else 'measured'}", file=sys.stderr, flush=True)

    records = measure(args.model, [s.text for s in setups], on_record=on_record, allocator=args.allocator, **kw)
    if not args.json:
        header, rows, notes = table(records)
        _print_table(header, rows, f"{args.model}, batch {args.batch} x {args.seq} tokens, {args.steps} steps, "
                                   f"{args.device}: live tensors at the worst point of the step")
        for note in notes:
            print(f"error  {note}")
    return EXIT_FAILED_RUNS if any(r.get("error") for r in records) else EXIT_OK


# --- entry point --------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``blockopt`` command; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except _UsageError as e:
        prog = "blockopt" + (f" {argv[0]}" if argv and argv[0] in ("bench", "plan", "calibrate", "hessian", "memory")
                                else "")
        print(f"{prog}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except SystemExit as e:  # --help, --version
        return int(e.code or 0)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    logging.basicConfig(level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if args.command == "hessian":
        from .hessian.cli import run as _run_hessian

        return _run_hessian(args)
    from .bench.errors import BenchInputError

    try:
        if args.command == "bench":
            return _cmd_bench(args, argv)
        if args.command == "calibrate":
            return _cmd_calibrate(args)
        if args.command == "memory":
            return _cmd_memory(args)
        return _cmd_plan(args)
    except BenchInputError as e:
        msg = " ".join(str(e).split())  # one line
        print(f"blockopt {args.command}: error: {msg}", file=sys.stderr)
        return EXIT_USAGE


def entry() -> None:
    """The ``blockopt`` console script: :func:`main`, then exit with its status.

    A rank of ``bench --parallel`` leaves through :func:`blockopt.distributed.launch.exit_process`,
    which skips interpreter teardown. Gloo's threads can abort a finished run there.
    """
    rc = main()
    from .distributed.launch import exit_process

    exit_process(rc)


if __name__ == "__main__":  # python -m blockopt.cli
    entry()
