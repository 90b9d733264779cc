"""The sweep: one protocol for every optimizer, runs with checkpoints, results on disk.

Protocol (``ALGORITHMS.md`` section 6): for a given seed every run starts from
the same weights and sees the same batches in the same order (start offsets
are drawn from the seed alone), for the same number of steps (the token
budget ``steps x batch_size x context``), with the same schedule (linear
warmup, then cosine to ``min_lr_ratio x lr``), the same gradient clipping, the
same weight-decay mask and the same held-out windows. Each optimizer may have
its own learning-rate grid; its winner is the learning rate with the lowest
final held-out loss (mean over seeds; a learning rate where any seed diverged
loses). Comparison is at the end of training only.

Layout of ``--out``::

    manifest.json          sweep identity (all settings that change results) and status
    runs/<run_id>/         metrics.jsonl (logged steps), checkpoint.pt (while running),
                           result.json (written when the run ends: it is then never repeated)
    metrics.jsonl          every run's logged steps (assembled at the end)
    summary.json           per-run results and per-optimizer winners (written last, atomically)
    report.md, *.png       the report (see :mod:`blockopt.bench.report`)

A folder holding a different sweep is refused; ``--resume`` continues the same
sweep: finished runs are kept, an interrupted run continues from its last
checkpoint (same batches, same schedule).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import multiprocessing as mp
import os
import queue as queue_mod
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .data import Corpus, DataSource, eval_windows, get_batch, load_corpus, resolve_source, train_batches
from .errors import BenchInputError
from .metrics import (
    StepTimer,
    aggregate,
    atomic_write_text,
    available_cpus,
    current_rss_bytes,
    environment,
    optimizer_state_bytes,
    param_bytes,
    peak_memory,
    reset_peak_memory,
    steps_to_reference_loss,
)
from .models import MODEL_PRESETS, build_model
from .optimizers import REGISTRY, Hyper, ModelInfo, OptimizerChoice, build_optimizer, parse_optimizer

__all__ = [
    "SWEEP_FORMAT",
    "RunSpec",
    "Sweep",
    "SweepConfig",
    "estimate_cost",
    "parse_lrs",
    "parse_seeds",
    "prepare_sweep",
    "run_sweep",
]

log = logging.getLogger(__name__)

SWEEP_FORMAT = 1
DTYPES = ("float32", "bfloat16")
LRS_HELP_EXAMPLE = "e.g. --lrs 1e-3,3e-3 or --lrs 'adamw=1e-3,3e-3;adam-mini=2e-3,4e-3'"
Emit = Callable[[dict[str, Any]], None]


# --- configuration ------------------------------------------------------------------------
@dataclass(frozen=True)
class SweepConfig:
    """Everything ``blockopt bench`` was asked to do (the CLI's flags, validated later)."""

    data: str | None = None
    max_data_bytes: int | None = None
    val_fraction: float = 0.1
    tokenizer: str = "byte"
    vocab_size: int | None = None
    model: str | None = None  # default llama-tiny
    hf_config: str | None = None
    optimizers: tuple[str, ...] = ("adamw", "adam-mini", "adam-mini-snr")
    lrs: str | None = None
    seeds: tuple[int, ...] = (0,)
    steps: int = 300
    batch_size: int = 16
    context: int = 128
    warmup: int | None = None  # default: 10 % of steps
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    eval_every: int | None = None  # default: steps // 10
    eval_batches: int = 8
    device: str = "cpu"
    dtype: str = "float32"
    # how to run (not part of the sweep's identity)
    out: str | None = None
    cache_dir: str | None = None
    threads: int | None = None
    isolate: str = "auto"  # auto | process | none
    checkpoint_every: int | None = None  # default: steps // 5; 0 = never
    resume: bool = False
    plots: bool = True
    argv: tuple[str, ...] = ()
    parallel: str = "none"  # none | fsdp | ddp (under torchrun)


@dataclass(frozen=True)
class RunSpec:
    index: int
    run_id: str
    optimizer: str  # the choice key, e.g. "adam-mini" or "adam-mini:value_single_block=true"
    label: str
    lr: float
    seed: int


@dataclass
class ModelSpec:
    """A built-in preset or an HF config; picklable (HF config travels as a dict)."""

    kind: str  # "builtin" | "hf"
    name: str
    vocab_size: int
    context: int
    overrides: dict[str, Any] = field(default_factory=dict)  # builtin: ModelConfig overrides
    hf_dict: dict[str, Any] | None = None

    def hf_config(self):
        from .hf import load_hf_config

        return load_hf_config(json.dumps(self.hf_dict), vocab_size=self.vocab_size)

    def build(self, device: torch.device | str, seed: int | None) -> nn.Module:
        if self.kind == "hf":
            from .hf import build_hf_model

            return build_hf_model(self.hf_config(), device=device, seed=seed)
        return build_model(self.name, vocab_size=self.vocab_size, device=device, seed=seed, **self.overrides)

    def info(self) -> ModelInfo:
        if self.kind == "hf":
            from .hf import hf_attention_shape

            return ModelInfo(*hf_attention_shape(self.hf_config()))
        cfg = dataclasses.replace(MODEL_PRESETS[self.name], **self.overrides)
        return ModelInfo(cfg.d_model, cfg.n_heads, cfg.kv_heads)

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.kind == "hf":
            logits = model(input_ids=x).logits  # [B, T, V]
            return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1))
        return model(x, y)

    def describe(self) -> dict[str, Any]:
        d: dict[str, Any] = {"kind": self.kind, "name": self.name, "vocab_size": self.vocab_size}
        if self.kind == "hf":
            d["hf_config"] = self.hf_dict
        else:
            cfg = dataclasses.replace(MODEL_PRESETS[self.name], vocab_size=self.vocab_size, **self.overrides)
            d["config"] = cfg.to_dict()
        return d


@dataclass
class Sweep:
    """A validated sweep: what will run, where, and whether ``--out`` already holds part of it."""

    config: SweepConfig
    source: DataSource
    model: ModelSpec
    choices: list[OptimizerChoice]
    lr_grids: dict[str, list[float]]
    runs: list[RunSpec]
    hyper: Hyper
    warmup: int
    eval_every: int
    checkpoint_every: int
    identity: dict[str, Any]
    sweep_id: str
    out: Path
    device: torch.device
    threads: int
    isolate: bool
    finished: set[str] = field(default_factory=set)  # run ids with a result.json
    partial: set[str] = field(default_factory=set)  # run ids with a checkpoint
    out_state: str = "new"  # new | resume | complete
    first_command: list[str] | None = None  # the command that started the sweep (when resuming)
    world_size: int = 1  # ranks of a --parallel run

    @property
    def command(self) -> list[str]:
        return self.first_command or ["blockopt", *self.config.argv]

    @property
    def tokens_per_run(self) -> int:
        return self.config.steps * self.config.batch_size * self.config.context

    def run_dir(self, run: RunSpec) -> Path:
        return self.out / "runs" / run.run_id


# --- parsing helpers ----------------------------------------------------------------------
def _parse_floats(text: str, what: str) -> list[float]:
    items = [t.strip() for t in text.split(",")]
    out: list[float] = []
    for t in items:
        try:
            v = float(t)
        except ValueError:
            raise BenchInputError(f"--lrs: {t!r} in {what} is not a number; {LRS_HELP_EXAMPLE}") from None
        if not (math.isfinite(v) and v > 0):
            raise BenchInputError(f"--lrs: {t!r} in {what} is not a positive finite learning rate; {LRS_HELP_EXAMPLE}")
        if v not in out:
            out.append(v)
    return out


def parse_lrs(text: str | None, choices: Sequence[OptimizerChoice]) -> dict[str, list[float]]:
    """Learning-rate grid per optimizer from ``--lrs``.

    ``1e-3,3e-3`` applies to every optimizer; ``adamw=1e-3,3e-3;adam-mini=2e-3`` gives
    per-optimizer grids (a key is an optimizer as written in ``--optimizers``, or its bare
    name for all its variants); a bare list among them (``1e-3;muon=2e-2``) applies to
    the optimizers not named. Without ``--lrs`` (or not named and no bare list): each
    optimizer's default learning rate.
    """
    keys = [c.key for c in choices]
    grids: dict[str, list[float]] = {}
    bare: list[float] | None = None
    if text is not None:
        if not text.strip():
            raise BenchInputError(f"--lrs: empty; {LRS_HELP_EXAMPLE}")
        parts = [p.strip() for p in text.split(";")]
        for part in parts:
            if not part:
                continue
            if "=" in part and not _looks_numeric(part):
                key, values = part.rsplit("=", 1)
                key = key.strip()
                if not values.strip():
                    raise BenchInputError(f"--lrs: no learning rates after {key!r}=; {LRS_HELP_EXAMPLE}")
                try:
                    canon = parse_optimizer(key, check_installed=False).key if ":" in key else key.lower()
                except BenchInputError:
                    canon = key
                names = {c.spec.name for c in choices}
                if canon not in keys and canon not in names:
                    raise BenchInputError(
                        f"--lrs: {key!r} is not one of the optimizers being compared ({', '.join(keys)})"
                    )
                if canon in grids:
                    raise BenchInputError(f"--lrs: {key!r} is given twice")
                grids[canon] = _parse_floats(values, repr(key))
            else:
                if bare is not None:
                    raise BenchInputError(f"--lrs: two lists without an optimizer name; {LRS_HELP_EXAMPLE}")
                bare = _parse_floats(part, "the list")
        if bare is None and not grids:
            raise BenchInputError(f"--lrs: empty; {LRS_HELP_EXAMPLE}")
    out = {}
    for c in choices:
        if c.key in grids:
            out[c.key] = grids[c.key]
        elif c.spec.name in grids:
            out[c.key] = grids[c.spec.name]
        elif bare is not None:
            out[c.key] = list(bare)
        else:
            out[c.key] = [c.spec.default_lr]
    return out


def _looks_numeric(part: str) -> bool:
    """``1e-3,3e-3`` has no optimizer name even if a value were typed with '='."""
    head = part.split("=", 1)[0].strip()
    try:
        float(head.split(",")[0])
        return True
    except ValueError:
        return False


def parse_seeds(text: str) -> tuple[int, ...]:
    out: list[int] = []
    for t in text.split(","):
        t = t.strip()
        try:
            v = int(t)
        except ValueError:
            raise BenchInputError(f"--seeds: {t!r} is not an integer; expected e.g. --seeds 0,1,2") from None
        if v < 0:
            raise BenchInputError(f"--seeds: {v} is negative; seeds are integers >= 0")
        if v in out:
            raise BenchInputError(f"--seeds: {v} is given twice")
        out.append(v)
    if not out:
        raise BenchInputError("--seeds: empty; expected e.g. --seeds 0,1,2")
    return tuple(out)


def _run_id(key: str, lr: float, seed: int) -> str:
    safe = "".join(ch if ch.isalnum() or ch in "-." else "_" for ch in key)
    return f"{safe}-lr{lr:.3g}-s{seed}"


# --- preparing a sweep --------------------------------------------------------------------
def _check_positive(name: str, v: float | None, *, allow_zero: bool = False) -> None:
    if v is None:
        return
    if not (v > 0 or (allow_zero and v == 0)) or not math.isfinite(v):
        raise BenchInputError(f"--{name}: {v}; expected a {'non-negative' if allow_zero else 'positive'} number")


def _model_spec(cfg: SweepConfig, vocab_size: int) -> ModelSpec:
    if cfg.hf_config is not None:
        if cfg.model is not None:
            raise BenchInputError("--model and --hf-config: give one of them, not both")
        from .hf import hf_max_positions, load_hf_config

        hf = load_hf_config(cfg.hf_config, vocab_size=vocab_size)
        max_pos = hf_max_positions(hf)
        if max_pos is not None and cfg.context > max_pos:
            raise BenchInputError(
                f"--context: {cfg.context} exceeds the config's {max_pos} positions; use --context <= {max_pos}"
            )
        d = hf.to_diff_dict()
        d["model_type"] = hf.model_type
        return ModelSpec("hf", f"hf:{hf.model_type}", vocab_size, cfg.context, hf_dict=d)
    name = cfg.model or "llama-tiny"
    if name not in MODEL_PRESETS:
        raise BenchInputError(f"--model: unknown model {name!r}; available: {', '.join(MODEL_PRESETS)}")
    overrides = {}
    if cfg.context > MODEL_PRESETS[name].max_seq_len:
        overrides["max_seq_len"] = cfg.context
    return ModelSpec("builtin", name, vocab_size, cfg.context, overrides=overrides)


def _vocab_size(cfg: SweepConfig) -> int:
    if cfg.tokenizer == "byte":
        if cfg.vocab_size not in (None, 256):
            raise BenchInputError(f"--vocab-size: {cfg.vocab_size} with --tokenizer byte; bytes have 256 symbols")
        return 256
    if cfg.tokenizer == "bpe":
        v = 4096 if cfg.vocab_size is None else cfg.vocab_size
        if v < 257 or v > 65536:
            raise BenchInputError(f"--vocab-size: {v}; a BPE vocabulary needs 257..65536 tokens")
        return v
    raise BenchInputError(f"--tokenizer: {cfg.tokenizer!r}; allowed: byte, bpe")


def _resolve_device(name: str) -> torch.device:
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise BenchInputError(f"--device: {name!r}; expected cpu or cuda (or cuda:N)") from None
    if dev.type not in ("cpu", "cuda"):
        raise BenchInputError(f"--device: {name!r}; expected cpu or cuda (or cuda:N)")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BenchInputError("--device cuda: no CUDA device is available to this torch build; use --device cpu")
    return dev


def prepare_sweep(cfg: SweepConfig) -> Sweep:
    """Validate every input and work out the runs, without writing anything.

    Raises :class:`BenchInputError` for bad input, including an ``--out`` folder that
    holds another sweep (or this one, without ``--resume``).
    """
    for name in ("steps", "batch_size", "context", "eval_batches"):
        v = getattr(cfg, name)
        if not isinstance(v, int) or v <= 0:
            raise BenchInputError(f"--{name.replace('_', '-')}: {v!r}; expected a positive integer")
    _check_positive("grad-clip", cfg.grad_clip, allow_zero=True)
    _check_positive("weight-decay", cfg.weight_decay, allow_zero=True)
    _check_positive("eps", cfg.eps)
    for name in ("beta1", "beta2"):
        v = getattr(cfg, name)
        if not 0.0 <= v < 1.0:
            raise BenchInputError(f"--betas: {name}={v}; expected a number in [0, 1)")
    if not 0.0 <= cfg.min_lr_ratio <= 1.0:
        raise BenchInputError(f"--min-lr-ratio: {cfg.min_lr_ratio}; expected a number in [0, 1]")
    if cfg.dtype not in DTYPES:
        raise BenchInputError(f"--dtype: {cfg.dtype!r}; allowed: {', '.join(DTYPES)}")
    if cfg.isolate not in ("auto", "process", "none"):
        raise BenchInputError(f"--isolate: {cfg.isolate!r}; allowed: auto, process, none")
    if cfg.threads is not None and cfg.threads <= 0:
        raise BenchInputError(f"--threads: {cfg.threads}; expected a positive integer")
    world_size = _check_parallel(cfg)
    device = _resolve_device(cfg.device)
    warmup = cfg.warmup if cfg.warmup is not None else max(1, cfg.steps // 10)
    if not 0 <= warmup < cfg.steps:
        raise BenchInputError(f"--warmup: {warmup}; expected 0 <= warmup < --steps ({cfg.steps})")
    eval_every = cfg.eval_every if cfg.eval_every is not None else max(1, cfg.steps // 10)
    if eval_every <= 0:
        raise BenchInputError(f"--eval-every: {eval_every}; expected a positive integer")
    ckpt = cfg.checkpoint_every if cfg.checkpoint_every is not None else max(1, cfg.steps // 5)
    if ckpt < 0:
        raise BenchInputError(f"--checkpoint-every: {ckpt}; expected an integer >= 0 (0: never)")

    # optimizers, learning rates, seeds
    if not cfg.optimizers:
        raise BenchInputError(f"--optimizers: empty; available: {', '.join(REGISTRY)}")
    choices: list[OptimizerChoice] = []
    for text in cfg.optimizers:
        c = parse_optimizer(text)
        if c.key in [x.key for x in choices]:
            raise BenchInputError(f"--optimizers: {c.key!r} is given twice")
        choices.append(c)
    if cfg.parallel != "none":
        bad = [c.key for c in choices if c.spec.name not in PARALLEL_OPTIMIZERS]
        if bad:
            raise BenchInputError(
                f"--optimizers: {', '.join(bad)} cannot run with --parallel {cfg.parallel}; "
                f"data-parallel runs support {', '.join(PARALLEL_OPTIMIZERS)}"
            )
        ckpt = 0  # opt.state_dict() is collective under FSDP2: no periodic checkpoints (and no --resume)
    lr_grids = parse_lrs(cfg.lrs, choices)
    if not cfg.seeds:
        raise BenchInputError("--seeds: empty; expected e.g. --seeds 0,1,2")

    # data, tokenizer, model (cheap checks: nothing is read or tokenized yet)
    source = resolve_source(cfg.data, cfg.max_data_bytes)
    if cfg.tokenizer == "bpe":
        try:
            import tokenizers  # noqa: F401
        except ImportError:
            raise BenchInputError(
                "--tokenizer bpe needs the package 'tokenizers': pip install 'blockopt[bench]'"
            ) from None
    vocab = _vocab_size(cfg)
    if cfg.plots:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise BenchInputError("plots need the package 'matplotlib': pip install 'blockopt[bench]' "
                                  "(or pass --no-plots)") from None
    if not 0.0 < cfg.val_fraction <= 0.5:
        raise BenchInputError(f"--val-fraction: {cfg.val_fraction}; expected a number in (0, 0.5]")
    model = _model_spec(cfg, vocab)

    hyper = Hyper(beta1=cfg.beta1, beta2=cfg.beta2, eps=cfg.eps, weight_decay=cfg.weight_decay, run_steps=cfg.steps)
    for c in choices:  # a calibration window that does not fit the run is an input error, before any run starts
        if c.spec.name.startswith("adam-mini-snr"):
            c.hyper(hyper).calibrate_steps()
    runs: list[RunSpec] = []
    for c in choices:
        for lr in lr_grids[c.key]:
            for seed in cfg.seeds:
                runs.append(RunSpec(len(runs), _run_id(c.key, lr, seed), c.key, c.label, lr, seed))
    identity = {
        "format": SWEEP_FORMAT,
        "data": {"key": source.key, "description": source.description, "max_bytes": source.max_bytes,
                 "val_fraction": cfg.val_fraction, "tokenizer": cfg.tokenizer, "vocab_size": vocab},
        "model": model.describe(),
        "optimizers": [c.key for c in choices],
        "lr_grids": lr_grids,
        "seeds": list(cfg.seeds),
        "steps": cfg.steps,
        "batch_size": cfg.batch_size,
        "context": cfg.context,
        "warmup": warmup,
        "min_lr_ratio": cfg.min_lr_ratio,
        "grad_clip": cfg.grad_clip,
        "hyper": {k: v for k, v in dataclasses.asdict(hyper).items()
                  if k not in ("run_steps", "calibrate", "snr_cutoff")},  # (run_steps is "steps"; the others
        # are per-optimizer options, part of the optimizer keys)
        "eval_every": eval_every,
        "eval_batches": cfg.eval_batches,
        "device": device.type,
        "dtype": cfg.dtype,
    }
    if cfg.parallel != "none":  # (absent otherwise: one-process sweeps keep their id)
        identity["parallel"] = {"mode": cfg.parallel, "world_size": world_size}
    sweep_id = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]
    out = Path(cfg.out) if cfg.out else Path("runs") / f"bench-{time.strftime('%Y%m%d-%H%M%S')}"
    threads = cfg.threads or available_cpus()
    isolate = cfg.parallel == "none" and (cfg.isolate == "process" or (cfg.isolate == "auto" and device.type == "cpu"))
    sweep = Sweep(cfg, source, model, choices, lr_grids, runs, hyper, warmup, eval_every, ckpt, identity,
                  sweep_id, out, device, threads, isolate, world_size=world_size)
    _check_out(sweep)
    return sweep


PARALLEL_CHOICES = ("none", "fsdp", "ddp")
PARALLEL_OPTIMIZERS = ("adamw", "adam-mini", "adamw+blr", "adam-mini+blr", "adam-mini-snr", "adam-mini-snr+blr")


def _check_parallel(cfg: SweepConfig) -> int:
    """The world size of a ``--parallel`` run (1 otherwise); rejects what it cannot do."""
    if cfg.parallel not in PARALLEL_CHOICES:
        raise BenchInputError(f"--parallel: {cfg.parallel!r}; allowed: {', '.join(PARALLEL_CHOICES)}")
    if cfg.parallel == "none":
        return 1
    import torch.distributed as dist

    if dist.is_initialized():
        world = dist.get_world_size()
    else:
        try:
            world = int(os.environ["WORLD_SIZE"])
        except (KeyError, ValueError):
            raise BenchInputError(
                f"--parallel {cfg.parallel}: not under torchrun (no WORLD_SIZE); launch with "
                f"`torchrun --nproc-per-node N $(which blockopt) bench --parallel {cfg.parallel} ...`"
            ) from None
    if cfg.batch_size % world:
        raise BenchInputError(
            f"--batch-size: {cfg.batch_size} does not divide by the world size {world}; with --parallel "
            f"--batch-size is the global batch, split evenly across the ranks"
        )
    if cfg.resume:
        raise BenchInputError(f"--resume: not supported with --parallel {cfg.parallel} yet; start a new --out")
    if cfg.checkpoint_every:
        raise BenchInputError(
            f"--checkpoint-every: {cfg.checkpoint_every}; not supported with --parallel {cfg.parallel} yet "
            f"(pass 0 or leave it out: parallel runs write no checkpoints)"
        )
    if cfg.isolate == "process":
        raise BenchInputError(f"--isolate process: not possible with --parallel {cfg.parallel}; each rank "
                              f"runs its runs in its own torchrun process (use --isolate auto or none)")
    return world


def _diff_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff_keys(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]


def _check_out(sweep: Sweep) -> None:
    out, cfg = sweep.out, sweep.config
    if out.exists() and not out.is_dir():
        raise BenchInputError(f"--out: {str(out)!r} is a file; expected a folder for the results")
    manifest_path = out / "manifest.json"
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        if cfg.resume:
            raise BenchInputError(f"--resume: {str(out)!r} holds no sweep to resume; drop --resume to start one")
        return
    if not manifest_path.is_file():
        raise BenchInputError(
            f"--out: {str(out)!r} is not empty and holds no blockopt sweep; choose a new or empty folder"
        )
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, json.JSONDecodeError):
        raise BenchInputError(f"--out: {str(manifest_path)!r} is unreadable; choose a new or empty folder") from None
    if manifest.get("sweep_id") != sweep.sweep_id:
        diff = _diff_keys(manifest.get("identity", {}), sweep.identity)
        raise BenchInputError(
            f"--out: {str(out)!r} holds a different sweep (sweep {manifest.get('sweep_id')}, differs in: "
            f"{', '.join(diff[:6]) or 'format'}); choose another --out"
        )
    complete = manifest.get("status") == "complete" and (out / "summary.json").is_file()
    sweep.first_command = manifest.get("command")
    if not cfg.resume:
        state = "a finished" if complete else "an unfinished"
        raise BenchInputError(
            f"--out: {str(out)!r} already holds {state} run of this sweep; pass --resume to continue it "
            f"or choose another --out"
        )
    for run in sweep.runs:
        d = sweep.run_dir(run)
        if (d / "result.json").is_file():
            sweep.finished.add(run.run_id)
        elif (d / "checkpoint.pt").is_file():
            sweep.partial.add(run.run_id)
    sweep.out_state = "complete" if complete else "resume"


# --- cost estimate ------------------------------------------------------------------------
def estimate_cost(sweep: Sweep, calibrate: bool = True) -> dict[str, Any]:
    """Parameters, tokens, FLOPs (6 N D) and, from a few timed steps on this machine, seconds."""
    meta = sweep.model.build("meta", seed=None)
    n_params = sum(p.numel() for p in meta.parameters())
    from ..partition import partition

    plan = partition(meta, warn=False)
    tokens = sweep.tokens_per_run
    todo = [r for r in sweep.runs if r.run_id not in sweep.finished]
    est: dict[str, Any] = {
        "params": n_params,
        "tokens_per_run": tokens,
        "flops_per_run": 6 * n_params * tokens,
        "runs": len(sweep.runs),
        "runs_to_do": len(todo),
        "adamw_state_bytes": plan.adamw_state_bytes(),
        "adam_mini_state_bytes": plan.state_bytes(),
        "step_s": None,
        "run_s": None,
        "total_s": None,
    }
    if calibrate and n_params <= 60_000_000:
        torch.set_num_threads(sweep.threads)
        model = sweep.model.build(sweep.device, seed=0)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        g = torch.Generator().manual_seed(0)
        x = torch.randint(0, sweep.model.vocab_size, (sweep.config.batch_size, sweep.config.context + 1), generator=g)
        x = x.to(sweep.device)
        timer = StepTimer(sweep.device)
        times = []
        for i in range(4):
            t0 = timer.time()
            with _autocast(sweep.device, sweep.config.dtype):
                loss = sweep.model.loss(model, x[:, :-1].contiguous(), x[:, 1:].contiguous())
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            times.append(timer.time() - t0)
            if i == 0 and times[0] > 20:
                break
        step_s = min(times[1:] or times)
        evals = sweep.config.steps // sweep.eval_every + 1
        eval_s = evals * sweep.config.eval_batches * step_s / 3  # a forward is about a third of a step
        run_s = sweep.config.steps * step_s + eval_s + (3.0 if sweep.isolate else 0.0)
        est.update(step_s=step_s, run_s=run_s, total_s=run_s * len(todo))
        del model, opt
    return est


# --- one run ------------------------------------------------------------------------------
@dataclass
class RunJob:
    """Everything one run needs, picklable (it crosses into a worker process)."""

    run: RunSpec
    choice_text: str
    model: ModelSpec
    hyper: Hyper
    steps: int
    batch_size: int
    context: int
    warmup: int
    min_lr_ratio: float
    grad_clip: float
    eval_every: int
    eval_batches: int
    checkpoint_every: int
    device: str
    dtype: str
    threads: int
    token_dir: str
    run_dir: str
    isolated: bool
    parallel: str = "none"  # fsdp | ddp: this process is one rank of a torchrun job


def _autocast(device: torch.device, dtype: str):
    if dtype == "bfloat16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def lr_at(step: int, lr: float, steps: int, warmup: int, min_ratio: float) -> float:
    """Learning rate of update ``step`` (0-based): linear warmup, then cosine to ``min_ratio * lr``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    span = max(1, steps - warmup)
    p = min(1.0, (step - warmup + 1) / span)
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * p)))




def _atomic_torch_save(obj: Any, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _json_num(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


@torch.no_grad()
def _evaluate(model: nn.Module, spec: ModelSpec, val: np.ndarray, offsets: np.ndarray, batch: int, context: int,
              device: torch.device, dtype: str) -> float:
    was_training = model.training
    model.eval()
    total, n = 0.0, 0
    for i in range(0, len(offsets), batch):
        x, y = get_batch(val, offsets[i:i + batch], context)
        with _autocast(device, dtype):
            loss = spec.loss(model, x.to(device), y.to(device))
        total += loss.item() * len(x)
        n += len(x)
    model.train(was_training)
    return total / n


def execute_run(job: RunJob, emit: Emit) -> dict[str, Any]:
    """Train one (optimizer, lr, seed); continue from ``checkpoint.pt`` if present. Writes the
    run's metrics and, when it ends (finished or diverged), ``result.json``; returns the result."""
    torch.set_num_threads(job.threads)
    run, device = job.run, torch.device(job.device)
    parallel = job.parallel != "none"
    ctx = None
    if parallel:
        from ..distributed import launch

        ctx = launch.init_distributed(device=job.device)  # idempotent: the CLI initialised it
        device = ctx.device
    is_main = ctx is None or ctx.is_main
    run_dir = Path(job.run_dir)
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path, metrics_path = run_dir / "checkpoint.pt", run_dir / "metrics.jsonl"
    train = np.load(Path(job.token_dir) / "train.npy", mmap_mode="r")
    val = np.load(Path(job.token_dir) / "val.npy", mmap_mode="r")
    offsets = train_batches(len(train), job.steps, job.batch_size, job.context, run.seed)
    val_offsets = eval_windows(len(val), job.eval_batches * job.batch_size, job.context)

    baseline_rss = current_rss_bytes()
    reset_peak_memory(device)
    model = job.model.build(device, seed=run.seed)  # the same seed, so the same weights, on every rank
    from ..partition import partition

    choice = parse_optimizer(job.choice_text)
    # the plan of the whole (unsharded) model, built before wrapping; FSDP2's DTensors keep global shapes
    plan = partition(model, warn=False, value_single_block=choice.hyper(job.hyper).value_single_block)
    if parallel:
        model = launch.wrap_model(model, job.parallel)
    inner = launch.unwrap(model) if parallel else model
    opt = build_optimizer(choice, inner, run.lr, job.hyper, plan=plan, info=job.model.info())
    params = [p for p in inner.parameters() if p.requires_grad]
    # the fused CPU kernel is built (first use on a machine, ~30 s) or loaded before the clock starts, so
    # that a cold cache does not count as training time; reported apart as kernel_load_s
    kernel_load_s = _load_kernels(opt, device)

    st: dict[str, Any] = {
        "step": 0, "train_time_s": 0.0, "wall_time_s": 0.0, "eval_time_s": 0.0,
        "fwd_bwd": [], "opt_step": [], "diverged": False, "diverged_step": None,
        "last_val": None, "best_val": None, "last_train": None, "resumed_from": None, "segments": 0,
    }
    # any randomness in training (dropout of an HF config) is seeded too, and restored on resume
    torch.manual_seed(run.seed)
    if parallel:  # no checkpoints under --parallel (prepare_sweep rejects --resume)
        if is_main and metrics_path.exists():
            metrics_path.unlink()
    elif ckpt_path.is_file():
        ck = torch.load(ckpt_path, map_location=device, weights_only=False)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        st.update(ck["state"])
        _set_rng(ck.get("rng"), device)
        st["resumed_from"] = st["step"]
        _truncate_metrics(metrics_path, st["step"])
    elif metrics_path.exists():
        metrics_path.unlink()
    st["segments"] += 1

    fwd_timer, opt_timer = StepTimer(device), StepTimer(device)
    fwd_timer.samples, opt_timer.samples = list(st["fwd_bwd"]), list(st["opt_step"])
    log_every = max(1, job.steps // 100)
    tokens_per_step = job.batch_size * job.context
    seg_start = time.perf_counter()
    acc_loss, acc_n = 0.0, 0
    emit({"type": "start", "run_id": run.run_id, "step": st["step"], "steps": job.steps})

    def line(step: int, **kw: Any) -> dict[str, Any]:
        return {"run": run.run_id, "optimizer": run.optimizer, "lr": run.lr, "seed": run.seed, "step": step,
                "tokens": step * tokens_per_step, "time_s": round(st["train_time_s"], 4), **kw}

    # under --parallel rank 0 alone writes; the others keep no file
    with (open(metrics_path, "a", encoding="utf-8") if is_main else contextlib.nullcontext()) as mf:
        def write(rec: dict[str, Any]) -> None:
            if mf is not None:
                mf.write(json.dumps(rec) + "\n")
                mf.flush()

        def do_eval(step: int) -> float:
            t0 = time.perf_counter()
            # every rank evaluates the same windows (FSDP2's forward is collective)
            v = _evaluate(model, job.model, val, val_offsets, job.batch_size, job.context, device, job.dtype)
            if parallel:
                v = launch.all_reduce_mean(v)  # equal on every rank; reduced so all agree on divergence
            st["eval_time_s"] += time.perf_counter() - t0
            return v

        if st["step"] == 0:
            v = do_eval(0)
            st["last_val"] = v
            write(line(0, val_loss=_json_num(v), lr_now=0.0))
        model.train()
        while st["step"] < job.steps and not st["diverged"]:
            step = st["step"]
            lr_now = lr_at(step, run.lr, job.steps, job.warmup, job.min_lr_ratio)
            for g in opt.param_groups:  # Blockwise LR groups carry their multiplier of the base rate
                g["lr"] = lr_now * g.get("lr_multiplier", 1.0)
            x, y = get_batch(train, offsets[step], job.context)
            if parallel:  # this rank's share of the global batch
                x, y = launch.shard_batch(x, ctx), launch.shard_batch(y, ctx)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            t0 = fwd_timer.time()
            with _autocast(device, job.dtype):
                loss = job.model.loss(model, x, y)
            loss.backward()
            if job.grad_clip > 0:
                gnorm = torch.nn.utils.clip_grad_norm_(params, job.grad_clip)
            else:
                gnorm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
            t1 = fwd_timer.time()
            opt.step()
            t2 = opt_timer.time()
            opt.zero_grad(set_to_none=True)
            fwd_timer.add(t1 - t0)
            opt_timer.add(t2 - t1)
            st["train_time_s"] += t2 - t0
            st["step"] = step = step + 1
            lv = launch.all_reduce_mean(loss) if parallel else loss.item()  # every rank: the global mean
            if not math.isfinite(lv):
                st["diverged"], st["diverged_step"] = True, step
                write(line(step, train_loss=None, diverged=True, lr_now=lr_now))
                break
            acc_loss += lv
            acc_n += 1
            st["last_train"] = lv
            rec: dict[str, Any] | None = None
            if step % log_every == 0 or step == job.steps:
                gn = gnorm.full_tensor() if hasattr(gnorm, "full_tensor") else gnorm  # FSDP2: a DTensor
                rec = line(step, train_loss=acc_loss / acc_n, lr_now=lr_now, grad_norm=_json_num(float(gn)))
                acc_loss, acc_n = 0.0, 0
            if step % job.eval_every == 0 or step == job.steps:
                v = do_eval(step)
                st["last_val"] = v
                if not math.isfinite(v):
                    st["diverged"], st["diverged_step"] = True, step
                else:
                    st["best_val"] = v if st["best_val"] is None else min(st["best_val"], v)
                rec = rec or line(step, lr_now=lr_now)
                rec["val_loss"] = _json_num(v)
                if st["diverged"]:
                    rec["diverged"] = True
            if rec is not None:
                write(rec)
                emit({"type": "step", "run_id": run.run_id, "step": step, "steps": job.steps,
                      "train_loss": rec.get("train_loss"), "val_loss": rec.get("val_loss")})
            if (job.checkpoint_every and not parallel and step % job.checkpoint_every == 0 and step < job.steps
                    and not st["diverged"]):
                st["fwd_bwd"], st["opt_step"] = fwd_timer.samples, opt_timer.samples
                wall = st["wall_time_s"] + time.perf_counter() - seg_start
                _atomic_torch_save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                                    "state": {**st, "wall_time_s": wall}, "rng": _get_rng(device)}, ckpt_path)
                emit({"type": "checkpoint", "run_id": run.run_id, "step": step})
    st["wall_time_s"] += time.perf_counter() - seg_start

    peak, peak_kind = peak_memory(device)
    if not job.isolated and peak_kind == "process_peak_rss":
        peak_kind = "process_peak_rss_shared"  # several runs in one process: a running maximum
    tokens = st["step"] * tokens_per_step
    final_val = None if st["diverged"] else st["last_val"]
    result = {
        "run_id": run.run_id,
        "optimizer": run.optimizer,
        "label": run.label,
        "lr": run.lr,
        "seed": run.seed,
        "status": "diverged" if st["diverged"] else "ok",
        "diverged": st["diverged"],
        "diverged_step": st["diverged_step"],
        "final_val_loss": _json_num(final_val),
        "best_val_loss": _json_num(st["best_val"]),
        "final_train_loss": _json_num(st["last_train"]),
        "steps": st["step"],
        "tokens": tokens,
        "train_time_s": st["train_time_s"],
        "eval_time_s": st["eval_time_s"],
        "wall_time_s": st["wall_time_s"],
        "tokens_per_s": tokens / st["train_time_s"] if st["train_time_s"] > 0 else None,
        "step_ms": opt_timer.mean_ms(),
        "step_ms_median": opt_timer.median_ms(),
        "fwd_bwd_ms": fwd_timer.mean_ms(),
        "state_bytes": optimizer_state_bytes(opt),  # under --parallel: this rank's (rank 0's) shards
        "param_bytes": param_bytes(inner),  # the whole model's (DTensor shapes are global)
        "params": sum(p.numel() for p in inner.parameters()),
        "peak_mem_bytes": peak,
        "peak_mem_kind": peak_kind,
        "baseline_mem_bytes": baseline_rss if device.type == "cpu" else None,
        "resumed_from_step": st["resumed_from"],
        "segments": st["segments"],
        "optimizer_class": type(opt).__name__,
        "kernel_load_s": kernel_load_s,
        **_snr_summary(opt),
    }
    if parallel:
        result.update(parallel=job.parallel, world_size=ctx.world_size, state_bytes_scope="per_rank",
                      peak_mem_scope="rank0")
    if not is_main:
        return result
    atomic_write_text(run_dir / "result.json", json.dumps(result, indent=1))
    with contextlib.suppress(FileNotFoundError):
        ckpt_path.unlink()
    emit({"type": "end", "run_id": run.run_id, "result": result})
    return result


def _load_kernels(opt: torch.optim.Optimizer, device: torch.device) -> float | None:
    """Build or load the fused CPU kernel when ``opt`` is one of ours on a CPU run; seconds it took."""
    if device.type != "cpu" or not type(opt).__module__.startswith("blockopt."):
        return None
    from ..kernels import load_cpu_kernel

    t0 = time.perf_counter()
    load_cpu_kernel()
    return round(time.perf_counter() - t0, 3)


def _snr_summary(opt: torch.optim.Optimizer) -> dict[str, Any]:
    """For AdamMini(calibrate=N): the window and, per role, how many tensors got each kind of block."""
    calib = getattr(opt, "calibration", None)
    if calib is None:
        return {}
    from ..partition.snr import rule_key

    by_role: dict[str, dict[str, int]] = {}
    plan = calib.chosen if calib.chosen is not None else calib.structural
    for e in plan.entries:
        kind = e.snr_choice or "structural"
        slot = by_role.setdefault(rule_key(e), {})
        slot[kind] = slot.get(kind, 0) + 1
    return {"snr_calibrate_steps": calib.window, "snr_phase": calib.phase, "snr_blocks_by_role": by_role,
            "snr_plan_blocks": plan.num_blocks}


def _get_rng(device: torch.device) -> dict[str, Any]:
    rng = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)
    return rng


def _set_rng(rng: dict[str, Any] | None, device: torch.device) -> None:
    if not rng:
        return
    torch.set_rng_state(rng["cpu"].cpu())
    if device.type == "cuda" and "cuda" in rng:
        torch.cuda.set_rng_state(rng["cuda"].cpu(), device)


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop logged lines past the checkpoint (they will be logged again)."""
    if not path.exists():
        return
    keep = []
    for ln in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(ln)
        except json.JSONDecodeError:
            continue  # a line cut by the interruption
        if rec.get("step", 0) <= step:
            keep.append(ln)
    atomic_write_text(path, "".join(k + "\n" for k in keep))


@contextlib.contextmanager
def _worker_env():
    """Environment of a worker: OpenMP threads that sleep instead of spinning when they wait
    (``OMP_WAIT_POLICY=PASSIVE``, unless set), which keeps timings sane when other processes
    compete for the cores; spinning threads can make a step 10x slower there."""
    key = "OMP_WAIT_POLICY"
    had = key in os.environ
    if not had:
        os.environ[key] = "PASSIVE"
    try:
        yield
    finally:
        if not had:
            os.environ.pop(key, None)


def _child_main(job: RunJob, q: Any) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        execute_run(job, q.put)
    except KeyboardInterrupt:
        q.put({"type": "error", "run_id": job.run.run_id, "error": "interrupted"})
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which records the run as failed
        q.put({"type": "error", "run_id": job.run.run_id, "error": f"{type(e).__name__}: {e}",
               "traceback": traceback.format_exc()})


def _run_in_process(job: RunJob, emit: Emit) -> dict[str, Any]:
    """A spawned worker: a fresh process, so its peak RSS is this run's alone."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    proc = ctx.Process(target=_child_main, args=(job, q), name=f"blockopt-bench-{job.run.run_id}")
    with _worker_env():
        proc.start()
    try:
        while True:
            try:
                ev = q.get(timeout=0.5)
            except queue_mod.Empty:
                if not proc.is_alive():
                    # drain what it may have put just before exiting
                    try:
                        ev = q.get(timeout=1.0)
                    except queue_mod.Empty:
                        raise RuntimeError(f"worker exited with code {proc.exitcode} and no result") from None
                else:
                    continue
            if ev["type"] == "end":
                return ev["result"]
            if ev["type"] == "error":
                if ev.get("traceback"):
                    log.debug("worker traceback:\n%s", ev["traceback"])
                raise RuntimeError(ev["error"])
            emit(ev)
    finally:
        proc.join(timeout=30)
        if proc.is_alive():
            proc.terminate()
            proc.join()


# --- the sweep ----------------------------------------------------------------------------
def _write_manifest(sweep: Sweep, status: str, corpus: Corpus | None = None) -> None:
    manifest = {
        "format": SWEEP_FORMAT,
        "sweep_id": sweep.sweep_id,
        "status": status,
        "identity": sweep.identity,
        "runs": [dataclasses.asdict(r) for r in sweep.runs],
        "command": sweep.command,
        "updated": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    if corpus is not None:
        manifest["data"] = corpus.to_dict()
    atomic_write_text(sweep.out / "manifest.json", json.dumps(manifest, indent=1))


def _job(sweep: Sweep, run: RunSpec, corpus: Corpus) -> RunJob:
    cfg = sweep.config
    choice_text = next(c.key for c in sweep.choices if c.key == run.optimizer)
    return RunJob(run, choice_text, sweep.model, sweep.hyper, cfg.steps, cfg.batch_size, cfg.context,
                  sweep.warmup, cfg.min_lr_ratio, cfg.grad_clip, sweep.eval_every, cfg.eval_batches,
                  sweep.checkpoint_every, str(sweep.device), cfg.dtype, sweep.threads, str(corpus.cache_path),
                  str(sweep.run_dir(run)), sweep.isolate, parallel=cfg.parallel)


def run_sweep(sweep: Sweep, emit: Emit = lambda ev: None) -> dict[str, Any]:
    """Run every run not finished yet, then write metrics.jsonl, report and summary.json.

    Returns the summary. A run that raises is recorded with ``status: "error"`` (and is
    retried by ``--resume``); a run whose loss becomes non-finite is ``"diverged"``.
    """
    cfg = sweep.config
    parallel = cfg.parallel != "none"
    is_main = True
    if parallel:
        from ..distributed import launch

        is_main = launch.is_main_process()
    emit({"type": "phase", "text": f"data: {sweep.source.description}"})

    def corpus_now() -> Corpus:
        return load_corpus(sweep.source, tokenizer=cfg.tokenizer, vocab_size=cfg.vocab_size,
                           val_fraction=cfg.val_fraction, cache_dir=cfg.cache_dir)

    if is_main:  # under --parallel rank 0 builds the token cache, then the others read it
        corpus = corpus_now()
    if parallel:
        launch.barrier()
        if not is_main:
            corpus = corpus_now()
    # fail early (before any run) if the splits are too short for the context
    train_batches(len(corpus.train), 1, 1, cfg.context, 0)
    eval_windows(len(corpus.val), 1, cfg.context)
    if is_main:
        sweep.out.mkdir(parents=True, exist_ok=True)
        _write_manifest(sweep, "running", corpus)
    emit({"type": "sweep_start", "runs": len(sweep.runs), "steps": cfg.steps, "finished": len(sweep.finished),
          "corpus": corpus.to_dict()})
    results: dict[str, dict[str, Any]] = {}
    for run in sweep.runs:
        res_path = sweep.run_dir(run) / "result.json"
        if res_path.is_file():
            results[run.run_id] = json.loads(res_path.read_text())
            emit({"type": "skip", "run_id": run.run_id, "index": run.index, "result": results[run.run_id]})
            continue
        emit({"type": "run_start", "run_id": run.run_id, "index": run.index, "label": run.label, "lr": run.lr,
              "seed": run.seed, "steps": cfg.steps})
        job = _job(sweep, run, corpus)
        try:
            res = _run_in_process(job, emit) if sweep.isolate else execute_run(job, emit)
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as e:  # a failing optimizer must not lose the others' results
            if parallel:  # the other ranks would wait for this one forever: stop the whole job
                raise
            log.debug("run %s failed", run.run_id, exc_info=True)
            res = {"run_id": run.run_id, "optimizer": run.optimizer, "label": run.label, "lr": run.lr,
                   "seed": run.seed, "status": "error", "error": str(e) or type(e).__name__, "diverged": False,
                   "final_val_loss": None}
        results[run.run_id] = res
        emit({"type": "run_end", "run_id": run.run_id, "index": run.index, "result": res})
    if not is_main:
        return {}
    summary = finish_sweep(sweep, corpus, [results[r.run_id] for r in sweep.runs])
    return summary


def finish_sweep(sweep: Sweep, corpus: Corpus, results: list[dict[str, Any]]) -> dict[str, Any]:
    """Assemble metrics.jsonl, plots, report.md, then summary.json (last: its presence means complete)."""
    from .report import write_report

    cfg = sweep.config
    lines: list[str] = []
    for run in sweep.runs:
        p = sweep.run_dir(run) / "metrics.jsonl"
        if p.is_file():
            lines += [ln for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]
    atomic_write_text(sweep.out / "metrics.jsonl", "".join(ln + "\n" for ln in lines))
    agg = aggregate(results, [c.key for c in sweep.choices], sweep.lr_grids)
    records = [json.loads(ln) for ln in lines]
    agg["steps_to_adamw_loss"] = steps_to_reference_loss(agg["winners"], results, records)
    summary = {
        "format": SWEEP_FORMAT,
        "sweep_id": sweep.sweep_id,
        "complete": all(r.get("status") in ("ok", "diverged") for r in results),
        "command": sweep.command,
        "last_command": ["blockopt", *cfg.argv],
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "environment": {**environment(sweep.device, cfg.dtype, sweep.threads),
                        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")
                        or ("PASSIVE (in run workers)" if sweep.isolate else "default"),
                        **({"parallel": cfg.parallel, "world_size": sweep.world_size,
                            "state_bytes": "per rank (local shards)"} if cfg.parallel != "none" else {})},
        "data": corpus.to_dict(),
        "model": {**sweep.model.describe(), "params": next((r.get("params") for r in results if r.get("params")),
                                                            None)},
        "protocol": {k: sweep.identity[k] for k in ("steps", "batch_size", "context", "warmup", "min_lr_ratio",
                                                    "grad_clip", "hyper", "eval_every", "eval_batches", "seeds",
                                                    "lr_grids", "dtype")},
        "tokens_per_run": sweep.tokens_per_run,
        "isolated_runs": sweep.isolate,
        "optimizers": {c.key: {"label": c.label, "description": c.spec.description} for c in sweep.choices},
        "runs": results,
        **agg,
    }
    write_report(sweep.out, summary, records, plots=cfg.plots)
    atomic_write_text(sweep.out / "summary.json", json.dumps(summary, indent=1))
    _write_manifest(sweep, "complete" if summary["complete"] else "incomplete", corpus)
    return summary

