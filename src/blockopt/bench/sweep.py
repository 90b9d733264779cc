"""What a sweep is: its configuration, the runs it holds, validation of every input, the cost estimate.

:func:`prepare_sweep` turns a :class:`SweepConfig` (the CLI's flags) into a :class:`Sweep`
without writing anything; :mod:`blockopt.bench.runner` runs it. The protocol is described
there.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..distributed import launch
from ..models import MODEL_PRESETS, build_model
from .data import DataSource, resolve_source
from .errors import BenchInputError
from .metrics import StepTimer, available_cpus
from .optimizers import REGISTRY, Hyper, ModelInfo, OptimizerChoice, parse_optimizer

__all__ = [
    "DTYPES",
    "PARALLEL_CHOICES",
    "PARALLEL_OPTIMIZERS",
    "SWEEP_FORMAT",
    "ModelSpec",
    "RunSpec",
    "Sweep",
    "SweepConfig",
    "autocast",
    "estimate_cost",
    "parse_lrs",
    "parse_seeds",
    "prepare_sweep",
]

SWEEP_FORMAT = 1
DTYPES = ("float32", "bfloat16")
LRS_HELP_EXAMPLE = "e.g. --lrs 1e-3,3e-3 or --lrs 'adamw=1e-3,3e-3;adam-mini=2e-3,4e-3'"


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
        allowed = TP_OPTIMIZERS if cfg.parallel in ("tp", "fsdp+tp") else PARALLEL_OPTIMIZERS
        bad = [c.key for c in choices if c.spec.name not in allowed or c.options.get("step_in_backward")]
        if bad:
            raise BenchInputError(
                f"--optimizers: {', '.join(bad)} cannot run with --parallel {cfg.parallel}; "
                f"{'tensor' if allowed is TP_OPTIMIZERS else 'data'}-parallel runs support {', '.join(allowed)} "
                "(without step_in_backward)"
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


PARALLEL_CHOICES = ("none", *launch.PARALLEL_CHOICES)  # launch's modes, or none
PARALLEL_OPTIMIZERS = ("adamw", "adam-mini", "adamw+blr", "adam-mini+blr", "adam-mini-snr", "adam-mini-snr+blr")
#: under --parallel tp / fsdp+tp: no in-run calibration (it needs FSDP2's row shards)
TP_OPTIMIZERS = ("adamw", "adam-mini", "adamw+blr", "adam-mini+blr")


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
    if cfg.parallel == "fsdp+tp" and world % launch.TP_DEGREE:
        raise BenchInputError(f"--parallel fsdp+tp: the world size {world} must divide by the tensor-parallel "
                              f"degree {launch.TP_DEGREE}")
    dp = 1 if cfg.parallel == "tp" else world // launch.TP_DEGREE if cfg.parallel == "fsdp+tp" else world
    if cfg.batch_size % dp:
        raise BenchInputError(
            f"--batch-size: {cfg.batch_size} does not divide by the data-parallel size {dp}; with --parallel "
            f"--batch-size is the global batch, split evenly across the data-parallel ranks"
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
            with autocast(sweep.device, sweep.config.dtype):
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



def autocast(device: torch.device, dtype: str):
    """bf16 autocast for ``--dtype bfloat16``; nothing for float32."""
    if dtype == "bfloat16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
