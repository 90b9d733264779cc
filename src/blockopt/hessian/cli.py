"""``blockopt hessian``: block spectra, block heterogeneity, dense heatmaps and a partition audit.

Wired into the ``blockopt`` command by :mod:`blockopt.cli` through
:func:`add_parser` (adds the ``hessian`` sub-command to an argparse
sub-parser collection) and :func:`run` (runs it; returns the exit status).
Also runnable alone: ``python -m blockopt.hessian.cli --model tiny-cnn``.

Exit status: 0 done; 2 bad input (one line on stderr: a parameter pattern
that matches nothing, a batch too large for memory, a model without double
backward, a missing file), nothing measured.

Outputs in ``--out``: ``summary.json`` (``heterogeneity``, ``noise_floor``,
per-block top eigenvalues and spectra statistics, partition scores, timings),
``js_matrix.csv``, ``densities.csv`` (the common grid and one density per
block), ``spectra.png``, ``js_matrix.png``, ``hessian_<param>.png`` (dense
Hessian heatmaps with the plan's block boundaries) and ``report.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import platform
import re
import sys
import time
from collections.abc import Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

import torch
from typing_extensions import Self

__all__ = ["add_parser", "main", "run"]

EXIT_OK, EXIT_USAGE = 0, 2
#: below this many parameters the run uses one CPU thread unless --threads says otherwise
SMALL_MODEL = 5_000_000

DESCRIPTION = """\
Measure the Hessian of a model's loss on one batch, block by block: the spectrum of every weight
block's own Hessian (stochastic Lanczos quadrature with deflated outliers; densities weighted by
|eigenvalue| on a log axis by default), the block heterogeneity (mean pairwise Jensen-Shannon
distance between those densities; Zhang et al. 2024) with its noise floor, each block's
largest-magnitude eigenvalues, and the dense Hessian of a chosen weight drawn as a heatmap with the
Adam-mini plan's blocks, with the share of Hessian mass each partition (per tensor / row / head /
plan) keeps inside its blocks next to random partitions of the same block sizes."""

EPILOG = """\
examples:
  blockopt hessian                                  # tiny Transformer, ~1 min on 2 cores
  blockopt hessian --model tiny-cnn --out runs/h-cnn
  blockopt hessian --model tiny-transformer --data shakespeare.txt --params 'blocks\\.0\\..*'
  blockopt hessian --hf-config gpt2-config.json --dense transformer.h.0.attn.c_attn.weight
  blockopt hessian --model tiny-mlp --json          # summary.json on stdout

--params takes regular expressions (full match on parameter names; repeatable). Heterogeneity
compares the tensors with >= --min-dim dimensions (default 2: weights, not biases or norm gains).
"""


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"{v} must be >= 1")
    return v


def _nonneg_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"{v} must be >= 0")
    return v


_UNITS = {"": 1, "b": 1, "k": 2**10, "kib": 2**10, "kb": 10**3, "m": 2**20, "mib": 2**20, "mb": 10**6,
          "g": 2**30, "gib": 2**30, "gb": 10**9, "t": 2**40, "tib": 2**40, "tb": 10**12}


def _bytes(text: str) -> int:
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size; e.g. 8GiB, 512MiB, 2e9")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``hessian`` sub-command to ``subparsers`` (from ``ArgumentParser.add_subparsers``)."""
    from .hvp import MODES
    from .models import BUILTIN_MODELS

    p = subparsers.add_parser(
        "hessian",
        help="block spectra, block heterogeneity, Hessian heatmaps and a partition audit",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g = p.add_argument_group("model and data")
    src = g.add_mutually_exclusive_group()
    src.add_argument("--model", choices=BUILTIN_MODELS, help="built-in model (default tiny-transformer)")
    src.add_argument("--hf-config", metavar="PATH_OR_JSON",
                     help="a transformers causal-LM config.json, a folder holding one, or inline JSON with a "
                          "model_type (built randomly initialised, never downloaded; bytes as tokens)")
    g.add_argument("--data", metavar="PATH",
                   help="language models: a text file, a folder of text files or a .npy/.pt of token ids; "
                        "tiny-cnn/tiny-mlp: a .pt ({'x': [N,C,H,W], 'y': [N]}) or .npz with x and y, or 'synthetic' "
                        "(default: stdlib sources / scikit-learn's 8x8 digits, the [vision] extra)")
    g.add_argument("--batch-size", type=_positive_int, metavar="B",
                   help="examples in the measured batch (default 8 sequences; 256 images)")
    g.add_argument("--seq-len", type=_positive_int, default=32, metavar="T", help="tokens per sequence (default 32)")
    g.add_argument("--train-steps", type=_nonneg_int, default=0, metavar="N",
                   help="AdamW steps (lr 1e-3) on other batches before measuring (default 0: at initialisation)")
    g = p.add_argument_group("measurement")
    g.add_argument("--params", action="append", metavar="REGEX",
                   help="parameters to study (full-match regex, repeatable; default: all trainable)")
    g.add_argument("--min-dim", type=_positive_int, default=2, metavar="D",
                   help="blocks are the tensors with >= D dims (default 2; 1 adds biases and norm gains)")
    g.add_argument("--probes", type=_positive_int, default=4, metavar="P", help="SLQ probes per block (default 4)")
    g.add_argument("--steps", type=_positive_int, default=40, metavar="M", help="Lanczos steps per probe (default 40)")
    g.add_argument("--deflate", type=_nonneg_int, default=8, metavar="K",
                   help="eigenvalues of largest magnitude per block found exactly before SLQ (default 8)")
    g.add_argument("--top-k", type=_nonneg_int, default=3, metavar="K",
                   help="largest-magnitude eigenvalues reported per block (default 3; 0 skips)")
    g.add_argument("--weighting", choices=("curvature", "count"), default="curvature",
                   help="densities compared: curvature (|lambda|-weighted, default) or count (plain spectral "
                        "density; biased on a log axis with few Lanczos steps)")
    g.add_argument("--sigma", type=float, metavar="S", help="Gaussian smoothing in decades (default 0.25)")
    g.add_argument("--dense", action="append", metavar="PARAM",
                   help="parameter whose dense Hessian is drawn (repeatable; default: the first query, conv or "
                        "hidden weight; 'none' skips)")
    g.add_argument("--dense-max", type=_positive_int, default=1024, metavar="N",
                   help="largest dense Hessian (entries); larger tensors are cut to their first whole plan "
                        "blocks (default 1024)")
    g.add_argument("--mode", choices=MODES, default="measure",
                   help="measure (default: no dropout, batch-norm batch statistics), eval, or train")
    g.add_argument("--dtype", choices=("float32", "float64"), default="float32", help="model precision")
    g.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N] (model, batch and Lanczos vectors)")
    g.add_argument("--seed", type=int, default=0, help="initialisation, batch and probes (default 0)")
    g.add_argument("--threads", type=_positive_int, metavar="N",
                   help="torch CPU threads (default 1 for models under 5M parameters, whose many small products "
                        "run fastest on one thread and suffer most from busy cores; torch's default otherwise)")
    g.add_argument("--max-memory", type=_bytes, metavar="SIZE",
                   help="memory the Hessian graph may use, e.g. 4GiB (default: free memory)")
    g = p.add_argument_group("output")
    g.add_argument("--out", metavar="DIR", help="results folder (default runs/hessian-<model>-<date>-<time>)")
    g.add_argument("--no-plots", action="store_true", help="skip the PNG files")
    g.add_argument("--progress", choices=("auto", "rich", "plain", "none"), default="auto",
                   help="progress on stderr (auto: rich on a terminal, else plain)")
    g.add_argument("--json", action="store_true", help="print summary.json on stdout")
    return p


# ---------------------------------------------------------------------------
# progress


class _Progress:
    """Phases with a counter, on stderr: rich bars on a terminal, plain lines otherwise."""

    def __init__(self, kind: str, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        if kind == "auto":
            kind = "rich" if self.stream.isatty() else "plain"
        self.kind = kind
        self._rich: Any = None
        self._task: Any = None
        self._last = 0.0
        self._t0 = time.perf_counter()
        if kind == "rich":
            try:
                from rich.console import Console
                from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

                self._rich = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                      TimeElapsedColumn(), console=Console(file=self.stream), transient=False)
            except ImportError:
                self.kind = "plain"

    def __enter__(self) -> Self:
        if self._rich is not None:
            self._rich.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._rich is not None:
            self._rich.__exit__(*exc)

    def note(self, text: str) -> None:
        if self.kind == "none":
            return
        if self._rich is not None:
            self._rich.console.print(text, highlight=False)
        else:
            print(f"[{time.perf_counter() - self._t0:6.1f}s] {text}", file=self.stream, flush=True)

    def phase(self, name: str, total: int) -> None:
        if self._rich is not None:
            self._task = self._rich.add_task(name, total=total)
        else:
            self._name, self._total = name, total
            self.note(f"{name}: 0/{total}")
        self._last = time.perf_counter()

    def update(self, done: int, total: int, label: str = "") -> None:
        if self.kind == "none":
            return
        if self._rich is not None and self._task is not None:
            self._rich.update(self._task, completed=done, total=total)
            return
        now = time.perf_counter()
        if done == total or now - self._last > 5:
            self._last = now
            self.note(f"{self._name}: {done}/{total} {label}".rstrip())


# ---------------------------------------------------------------------------
# the run


def _problem(args: argparse.Namespace, dtype: torch.dtype):
    from .models import build_hf_problem, build_problem

    if args.hf_config is not None:
        return build_hf_problem(args.hf_config, data=args.data, batch_size=args.batch_size or 4,
                                seq_len=args.seq_len, seed=args.seed, dtype=dtype)
    return build_problem(args.model or "tiny-transformer", data=args.data, batch_size=args.batch_size,
                         seq_len=args.seq_len, seed=args.seed, dtype=dtype)


def _to(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: _to(v, device) for k, v in batch.items()}
    return batch


def _device(text: str) -> torch.device:
    from .hvp import HessianInputError

    try:
        dev = torch.device(text)
    except RuntimeError:
        raise HessianInputError(f"--device: {text!r} is not a device; expected cpu or cuda[:N]") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise HessianInputError(f"--device: {text!r}, but CUDA is not available here; use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise HessianInputError(f"--device: {text!r}; allowed: cpu, cuda[:N]")
    return dev


def _warm_up(problem: Any, steps: int, device: torch.device) -> list[float]:
    """A few AdamW steps (torch.optim, lr 1e-3) on batches other than the measured one."""
    if steps == 0 or problem.train_batches is None:
        return []
    model = problem.model
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    was = model.training
    model.train()
    for batch in problem.train_batches(steps):
        opt.zero_grad(set_to_none=True)
        loss = problem.loss_fn(model, _to(batch, device))
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    model.train(was)
    return losses


def _default_dense(problem: Any, op: Any, plan: Any) -> list[str]:
    if problem.dense_param and problem.dense_param in op.names:
        return [problem.dense_param]
    for role in ("query", "qkv"):
        for n in op.names:
            if n in plan and plan[n].role == role:
                return [n]
    two_d = [n for n, s in zip(op.names, op.shapes) if len(s) >= 2]
    return two_d[1:2] or two_d[:1]


def _resolve_dense(specs: Sequence[str] | None, problem: Any, op: Any, plan: Any) -> list[str]:
    from .hvp import HessianInputError

    if not specs:
        return _default_dense(problem, op, plan)
    if any(s.lower() == "none" for s in specs):
        return []
    out = []
    for s in specs:
        hits = [n for n in op.names if n == s or re.fullmatch(s, n)]
        if not hits:
            raise HessianInputError(
                f"--dense: {s!r} matches none of the measured parameters (e.g. {op.names[:4]}); "
                "pass a name from --params' selection"
            )
        out.extend(h for h in hits if h not in out)
    return out


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def _write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def _fmt(x: float) -> str:
    return f"{x:.3g}" if x is not None else "-"


def _report(summary: dict[str, Any], files: list[str]) -> str:
    h = summary["heterogeneity"]
    lines = [
        f"# Hessian report: {summary['model']['name']}",
        "",
        f"- data: {summary['data']}",
        (f"- batch: {summary['model'].get('info', {}).get('batch_size', '?')} examples, loss {summary['loss']:.4f}"
         + (f", after {summary['train_steps']} AdamW steps" if summary["train_steps"] else ", at initialisation")),
        (f"- measured: {summary['measured']['tensors']} tensors, {summary['measured']['numel']:,} parameters; "
         f"mode {summary['settings']['mode']}, {summary['settings']['dtype']}, seed {summary['settings']['seed']}"),
        (f"- SLQ: {summary['settings']['probes']} probes x {summary['settings']['steps']} Lanczos steps per block, "
         f"{h['matvecs']:,} Hessian-vector products; wall time {summary['timing_s']['total']:.1f} s"),
        "",
        "## Block heterogeneity",
        "",
        (f"**{h['heterogeneity']:.3f}** = mean pairwise Jensen-Shannon distance (0 = identical, 1 = disjoint) "
         f"between the {'curvature-weighted (|lambda|) ' if h['weighting'] == 'curvature' else ''}spectral "
         f"densities of the {h['num_blocks']} blocks' own Hessians, on a symmetric log axis "
         f"(|eigenvalues| below {h['grid']['floor']:.2g} count as zero; smoothing {h['grid']['sigma']:g} decades). "
         + (f"Noise floor (same block, two halves of the probes): {h['noise_floor']:.3f}."
            if h.get("noise_floor") is not None else "")),
        ("Reference (benchmarks/hessian_findings.py, same settings): the built-in tiny Transformer scores clearly "
         "above the tiny CNN and MLP at initialisation; the numbers are not comparable with the paper's JS0."),
        "",
        "| block | entries | largest-magnitude eigenvalues | lambda_min (SLQ) | mean JS to others |",
        "|---|---:|---|---:|---:|",
    ]
    for b in h["blocks"]:
        top = b.get("top_eigenvalues") or [b["lambda_max_slq"]]
        lines.append(f"| {b['name']} | {b['numel']:,} | {', '.join(_fmt(x) for x in top)} | "
                     f"{_fmt(b['lambda_min_slq'])} | {b['mean_js']:.3f} |")
    if summary["dense"]:
        lines += ["", "## Dense Hessians and partition scores", "",
                  ("score = ||H inside the partition's blocks||_F / ||H||_F; random = the mean score of random "
                   "partitions with the same block sizes; lift = (score - random) / (1 - random), 0 = chance, "
                   "1 = block diagonal. Per tensor is 1 on a single tensor by definition; a partition is judged "
                   "against random and structured partitions with the same number of blocks."), ""]
        for d in summary["dense"]:
            lines += [f"### {d['param']} ({d['numel']:,} entries{', ' + d['slice'] if d['slice'] else ''})", "",
                      "| partition | blocks | score | random, same sizes | lift |", "|---|---:|---:|---:|---:|"]
            for s in d["partitions"]:
                lines.append(f"| {s['partition']} | {s['num_blocks']} | {s['score']:.3f} | "
                             f"{s['random_same_sizes']:.3f} | {s['lift']:.3f} |")
            if d.get("heatmap"):
                lines += ["", f"![{d['param']}]({d['heatmap']})"]
            lines.append("")
    if files:
        lines += ["", "## Files", ""] + [f"- {f}" for f in files]
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def _flush_denormal() -> Iterator[None]:
    # float32 Hessian-vector products of small curvatures produce denormals, which are ~100x slower
    # on CPUs; the CLI flushes them to zero for its own run and switches it back off afterwards.
    supported = torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if supported:
            torch.set_flush_denormal(False)


def run(args: argparse.Namespace) -> int:
    """Run ``blockopt hessian`` with parsed ``args``; returns the exit status (0 ok, 2 bad input)."""
    from .hvp import DoubleBackwardError, HessianInputError

    threads = torch.get_num_threads()
    try:
        if args.threads:
            torch.set_num_threads(args.threads)
        with _flush_denormal():
            return _run(args)
    except (HessianInputError, DoubleBackwardError) as e:
        msg = " ".join(str(e).split())
        print(f"blockopt hessian: error: {msg}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace) -> int:
    from ..partition import partition
    from ..utils import fmt_bytes as _fmt_bytes
    from .dense import compare_partitions, dense_hessian, plan_slice, plot_heatmap, standard_partitions
    from .heterogeneity import heterogeneity, plot_js_matrix, plot_spectra, tensor_blocks
    from .hvp import HessianInputError, HessianOperator

    t0 = time.perf_counter()
    timing: dict[str, float] = {}
    dtype = torch.float64 if args.dtype == "float64" else torch.float32
    if args.sigma is not None and not args.sigma > 0:
        raise HessianInputError(f"--sigma: {args.sigma}; expected a positive number of decades")
    plots = not args.no_plots
    if plots:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise HessianInputError("plots need matplotlib (pip install 'blockopt[bench]'), or pass --no-plots") from None
    device = _device(args.device)
    progress = _Progress("none" if (args.json and args.progress == "auto") else args.progress)
    with progress:
        problem = _problem(args, dtype)
        problem.model.to(device)
        problem.batch = _to(problem.batch, device)
        model_name = problem.name
        out = Path(args.out) if args.out else Path("runs") / (
            f"hessian-{_safe(model_name)}-{datetime.now().strftime('%Y%m%d-%H%M%S')}")
        n_params = sum(p.numel() for p in problem.model.parameters())
        if not args.threads and n_params < SMALL_MODEL:
            torch.set_num_threads(1)  # restored by run()
        progress.note(f"{model_name}: {n_params:,} parameters; data: {problem.data}; "
                      f"{torch.get_num_threads()} thread(s)")
        losses = _warm_up(problem, args.train_steps, device)
        if losses:
            progress.note(f"warm-up: {len(losses)} AdamW steps, loss {losses[0]:.3f} -> {losses[-1]:.3f}")
        timing["setup"] = time.perf_counter() - t0
        plan = partition(problem.model, warn=False)

        t = time.perf_counter()
        op = HessianOperator(problem.model, problem.batch, problem.loss_fn, args.params, seed=args.seed,
                             mode=args.mode, max_memory=args.max_memory)
        timing["graph"] = time.perf_counter() - t
        mem = op.memory
        if mem is not None:
            progress.note(f"graph: {len(op.names)} tensors, {op.numel:,} parameters, loss {op.loss.item():.4f}; "
                          f"memory estimate {_fmt_bytes(mem.total)}"
                          + (f" of {_fmt_bytes(mem.available)} free" if mem.available else ""))
        dense_names = _resolve_dense(args.dense, problem, op, plan)

        t = time.perf_counter()
        blocks = tensor_blocks(op, plan, min_dim=args.min_dim)
        if len(blocks) < 2:
            raise HessianInputError(
                f"--params/--min-dim: {len(blocks)} tensor(s) with >= {args.min_dim} dimensions selected "
                f"({op.names[:4]}); heterogeneity compares at least two (select more, or --min-dim 1)")
        progress.phase("block spectra", len(blocks) * (2 if args.top_k > args.deflate else 1))
        het = heterogeneity(op, blocks, num_probes=args.probes, num_steps=args.steps,
                            deflate=args.deflate, weighting=args.weighting, seed=args.seed, sigma=args.sigma,
                            top_k=args.top_k, progress=lambda d, n, name: progress.update(d, n, name))
        timing["spectra"] = time.perf_counter() - t
        noise = f", noise floor {het.noise_floor:.3f}" if het.noise_floor is not None else ""
        progress.note(f"heterogeneity {het.heterogeneity:.3f} over {len(het.blocks)} blocks{noise}")

        out.mkdir(parents=True, exist_ok=True)
        files: list[str] = []
        dense_rows = []
        t = time.perf_counter()
        for name in dense_names:
            i = op.names.index(name)
            shape = op.shapes[i]
            entry = plan.get(name)
            index = plan_slice(shape, entry, args.dense_max)
            n = op.sizes[i] if index is None else int(index.numel())
            progress.phase(f"dense {name}", n)
            H = dense_hessian(op, name, index, symmetrize=True, max_numel=max(args.dense_max, 1),
                              progress=lambda d, total: progress.update(d, total))
            parts = standard_partitions(shape, entry, head_dim=problem.head_dim, index=index)
            scores = compare_partitions(H, parts, seed=args.seed)
            row = {"param": name, "shape": list(shape), "numel": n,
                   "slice": None if index is None else f"first {n} of {op.sizes[i]} entries (whole plan blocks)",
                   "plan": entry.describe() if entry is not None else None,
                   "partitions": [s.to_dict() for s in scores], "heatmap": None}
            if plots:
                fname = f"hessian_{_safe(name)}.png"
                labels = parts.get("plan", parts.get("per-row"))
                plot_heatmap(H, out / fname, labels=labels,
                             title=f"|H| of {name}{' (slice)' if index is not None else ''}; lines: plan blocks "
                                   f"({entry.describe() if entry is not None else 'rows'})")
                row["heatmap"] = fname
                files.append(fname)
            dense_rows.append(row)
            best = max(scores, key=lambda s: s.lift)
            progress.note(f"dense {name}: " + ", ".join(f"{s.name} {s.score:.3f} (random {s.random:.3f})"
                                                        for s in scores if s.name != "per-tensor")
                          + f"; highest lift: {best.name}")
        timing["dense"] = time.perf_counter() - t

        t = time.perf_counter()
        names = het.names
        _write_csv(out / "js_matrix.csv", ["block", *names],
                   [[n, *[f"{v:.6f}" for v in row]] for n, row in zip(names, het.js.tolist())])
        axis = het.grid.inverse(het.grid.points)
        _write_csv(out / "densities.csv", ["t", "eigenvalue", *names],
                   [[f"{float(tp):.6g}", f"{float(ev):.6g}", *[f"{float(v):.6g}" for v in col]]
                    for tp, ev, col in zip(het.grid.points, axis, het.densities.T)])
        files[:0] = ["summary.json", "js_matrix.csv", "densities.csv"]
        if plots:
            plot_spectra(het, out / "spectra.png",
                         title=f"{model_name}: block spectra (heterogeneity {het.heterogeneity:.3f})")
            plot_js_matrix(het, out / "js_matrix.png", title=f"{model_name}: JS distance between block spectra")
            files[3:3] = ["spectra.png", "js_matrix.png"]
        timing["write"] = time.perf_counter() - t
        timing["total"] = time.perf_counter() - t0
        hsum = het.summary()
        summary = {
            "heterogeneity": het.heterogeneity,
            "noise_floor": het.noise_floor,
            "top_eigenvalues": {b["name"]: b.get("top_eigenvalues", [b["lambda_max_slq"]]) for b in hsum["blocks"]},
            "model": {"name": model_name, "parameters": n_params, "info": problem.info},
            "data": problem.data,
            "loss": float(op.loss),
            "train_steps": len(losses),
            "measured": {"tensors": len(op.names), "numel": op.numel, "params": op.names},
            "memory_estimate_bytes": mem.total if mem is not None else None,
            "settings": {"device": str(device), "probes": args.probes, "steps": args.steps, "deflate": args.deflate,
                         "top_k": args.top_k, "weighting": args.weighting, "min_dim": args.min_dim,
                         "mode": args.mode, "dtype": args.dtype, "seed": args.seed, "sigma": het.grid.sigma,
                         "dense_max": args.dense_max},
            "heterogeneity_detail": hsum,
            "js_matrix": {"blocks": names, "values": het.js.tolist()},
            "dense": dense_rows,
            "timing_s": timing,
            "environment": {"torch": torch.__version__, "python": platform.python_version(),
                            "threads": torch.get_num_threads(), "platform": platform.platform()},
        }
        # the report reads the same dict; summary.json is written last so it reflects everything
        report = _report({**summary, "heterogeneity": hsum}, files[1:] + ["report.md"])
        (out / "report.md").write_text(report, encoding="utf-8")
        (out / "summary.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
        op.close()
    if args.json:
        print(json.dumps(summary, indent=1))
    else:
        print(f"{model_name}: heterogeneity {het.heterogeneity:.3f} over {len(het.blocks)} blocks"
              + (f" (noise floor {het.noise_floor:.3f})" if het.noise_floor is not None else "")
              + f", {het.matvecs:,} Hessian-vector products, {timing['total']:.1f} s")
        for d in dense_rows:
            print(f"  {d['param']}: " + ", ".join(f"{s['partition']} {s['score']:.3f}/{s['random_same_sizes']:.3f}"
                                                   for s in d["partitions"]) + "  (score/random same sizes)")
        print(f"report: {out / 'report.md'}")
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m blockopt.hessian.cli [args]``: the sub-command on its own."""
    parser = argparse.ArgumentParser(prog="blockopt")
    sub = parser.add_subparsers(dest="command")
    add_parser(sub)
    args = parser.parse_args(["hessian", *(sys.argv[1:] if argv is None else argv)])
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
