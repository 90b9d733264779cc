"""The sweep: one protocol for every optimizer, runs with checkpoints, results on disk.

Protocol (``docs/algorithms.md`` section 8): for a given seed every run starts from
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
checkpoint (same batches, same schedule). Checkpoints hold tensors and plain values only and
are read with ``torch.load(weights_only=True)`` (:mod:`blockopt.bench.checkpoints`).

The sweep's definition and validation are in :mod:`blockopt.bench.sweep` (re-exported here).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import multiprocessing as mp
import os
import queue as queue_mod
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..distributed import launch
from ..utils import atomic_write_text
from .checkpoints import (
    atomic_torch_save,
    get_rng,
    load_checkpoint,
    make_checkpoint,
    set_rng,
    truncate_metrics,
    unsafe_objects,
)
from .data import Corpus, eval_windows, get_batch, load_corpus, train_batches
from .metrics import (
    StepTimer,
    aggregate,
    current_rss_bytes,
    environment,
    optimizer_state_bytes,
    param_bytes,
    peak_memory,
    reset_peak_memory,
    steps_to_reference_loss,
)
from .optimizers import Hyper, build_optimizer, parse_optimizer
from .run_state import RunState
from .sweep import (  # noqa: F401  (re-exported: the sweep's definition lived here)
    DTYPES,
    LRS_HELP_EXAMPLE,
    PARALLEL_CHOICES,
    PARALLEL_OPTIMIZERS,
    SWEEP_FORMAT,
    ModelSpec,
    RunSpec,
    Sweep,
    SweepConfig,
    autocast,
    estimate_cost,
    parse_lrs,
    parse_seeds,
    prepare_sweep,
)

__all__ = [
    "SWEEP_FORMAT",
    "RunJob",
    "RunSpec",
    "RunState",
    "Sweep",
    "SweepConfig",
    "estimate_cost",
    "execute_run",
    "lr_at",
    "parse_lrs",
    "parse_seeds",
    "prepare_sweep",
    "run_sweep",
]

log = logging.getLogger(__name__)

Emit = Callable[[dict[str, Any]], None]


# --- one run ------------------------------------------------------------------------------
#
# execute_run(job, emit) = _open_run -> _start_state (-> _resume) -> _train (-> _train_step,
# _evaluate_run, _save_checkpoint) -> _run_result -> _finish_run. What is fixed for the run (data,
# model, optimizer, timers) is a RunSetup; what changes and is checkpointed is a RunState.
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


@dataclass
class RunSetup:
    """What one run is built from, fixed for its whole length: the job, where it runs, its data,
    model and optimizer, and its timers (their samples are restored from a checkpoint)."""

    job: RunJob
    device: torch.device
    dist: Any  # the DistContext of this rank under --parallel, else None
    run_dir: Path
    train: np.ndarray
    val: np.ndarray
    offsets: np.ndarray  # [steps, batch_size] starts of the training windows
    val_offsets: np.ndarray  # starts of the held-out windows
    model: nn.Module  # as trained: wrapped by FSDP2/DDP under --parallel
    inner: nn.Module  # the bare model
    opt: torch.optim.Optimizer
    params: list[torch.Tensor]  # the trained parameters (clipping, gradient norm)
    baseline_rss: int | None
    kernel_load_s: float | None
    fwd_timer: StepTimer
    opt_timer: StepTimer
    checkpoint_warned: bool = False

    @property
    def run(self) -> RunSpec:
        return self.job.run

    @property
    def parallel(self) -> bool:
        return self.job.parallel != "none"

    @property
    def is_main(self) -> bool:
        return self.dist is None or self.dist.is_main

    @property
    def ckpt_path(self) -> Path:
        return self.run_dir / "checkpoint.pt"

    @property
    def metrics_path(self) -> Path:
        return self.run_dir / "metrics.jsonl"

    @property
    def tokens_per_step(self) -> int:
        return self.job.batch_size * self.job.context


def lr_at(step: int, lr: float, steps: int, warmup: int, min_ratio: float) -> float:
    """Learning rate of update ``step`` (0-based): linear warmup, then cosine to ``min_ratio * lr``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    span = max(1, steps - warmup)
    p = min(1.0, (step - warmup + 1) / span)
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * p)))


def _atomic_torch_save(obj: Any, path: Path) -> None:
    """How a checkpoint reaches the disk (see :func:`blockopt.bench.checkpoints.atomic_torch_save`)."""
    atomic_torch_save(obj, path)


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
        with autocast(device, dtype):
            loss = spec.loss(model, x.to(device), y.to(device))
        total += loss.item() * len(x)
        n += len(x)
    model.train(was_training)
    return total / n


def execute_run(job: RunJob, emit: Emit) -> dict[str, Any]:
    """Train one (optimizer, lr, seed); continue from ``checkpoint.pt`` if present. Writes the
    run's metrics and, when it ends (finished or diverged), ``result.json``; returns the result."""
    setup = _open_run(job)
    state = _start_state(setup)
    _train(setup, state, emit)
    result = _run_result(setup, state)
    if setup.is_main:  # under --parallel rank 0 alone writes
        _finish_run(setup, result, emit)
    return result


def _open_run(job: RunJob) -> RunSetup:
    """Threads, the process group (``--parallel``), the run's folder and data, then the model and optimizer."""
    torch.set_num_threads(job.threads)
    device, dist = torch.device(job.device), None
    if job.parallel != "none":
        dist = launch.init_distributed(device=job.device)  # idempotent: the CLI initialised it
        device = dist.device
    run_dir = Path(job.run_dir)
    if dist is None or dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    train = np.load(Path(job.token_dir) / "train.npy", mmap_mode="r")
    val = np.load(Path(job.token_dir) / "val.npy", mmap_mode="r")
    offsets = train_batches(len(train), job.steps, job.batch_size, job.context, job.run.seed)
    val_offsets = eval_windows(len(val), job.eval_batches * job.batch_size, job.context)

    baseline_rss = current_rss_bytes()
    reset_peak_memory(device)
    model, inner, opt = _build(job, device)
    params = [p for p in inner.parameters() if p.requires_grad]
    # the fused CPU kernel is built (first use on a machine, ~30 s) or loaded before the clock starts, so
    # that a cold cache does not count as training time; reported apart as kernel_load_s
    kernel_load_s = _load_kernels(opt, device)
    return RunSetup(job, device, dist, run_dir, train, val, offsets, val_offsets, model, inner, opt, params,
                    baseline_rss, kernel_load_s, StepTimer(device), StepTimer(device))


def _build(job: RunJob, device: torch.device) -> tuple[nn.Module, nn.Module, torch.optim.Optimizer]:
    """The model (wrapped under ``--parallel``), the bare model, and the optimizer over it."""
    model = job.model.build(device, seed=job.run.seed)  # the same seed, so the same weights, on every rank
    from ..partition import partition

    choice = parse_optimizer(job.choice_text)
    # the plan of the whole (unsharded) model, built before wrapping; FSDP2's DTensors keep global shapes
    plan = partition(model, warn=False, value_single_block=choice.hyper(job.hyper).value_single_block)
    if job.parallel != "none":
        model = launch.wrap_model(model, job.parallel)
    inner = launch.unwrap(model) if job.parallel != "none" else model
    opt = build_optimizer(choice, inner, job.run.lr, job.hyper, plan=plan, info=job.model.info())
    if choice.hyper(job.hyper).step_in_backward:  # one process only (prepare_sweep refuses --parallel)
        from ..optim import step_in_backward

        # the bench clips by the global norm, which this mode cannot hold: the previous step's norm instead
        clip = job.grad_clip if job.grad_clip > 0 else None
        step_in_backward(opt, clip="previous" if clip else None, max_norm=clip)
    return model, inner, opt


def _start_state(setup: RunSetup) -> RunState:
    """The state the run starts this segment from: fresh, or its checkpoint's (``--resume``)."""
    state = RunState()
    # any randomness in training (dropout of an HF config) is seeded too, and restored on resume
    torch.manual_seed(setup.run.seed)
    if setup.parallel:  # no checkpoints under --parallel (prepare_sweep rejects --resume)
        if setup.is_main and setup.metrics_path.exists():
            setup.metrics_path.unlink()
    elif setup.ckpt_path.is_file():
        state = _resume(setup)
    elif setup.metrics_path.exists():
        setup.metrics_path.unlink()
    state.segments += 1
    setup.fwd_timer.samples, setup.opt_timer.samples = list(state.fwd_bwd), list(state.opt_step)
    return state


def _resume(setup: RunSetup) -> RunState:
    """Load ``checkpoint.pt`` (``weights_only=True``) into the model, optimizer and RNG; drop the
    metrics logged after it (they are logged again). Raises CheckpointError for a file it refuses."""
    ck = load_checkpoint(setup.ckpt_path, setup.device)
    setup.model.load_state_dict(ck.model)
    setup.opt.load_state_dict(ck.optimizer)
    state = ck.state
    set_rng(ck.rng, setup.device)
    state.resumed_from = state.step
    truncate_metrics(setup.metrics_path, state.step)
    return state


def _train_step(setup: RunSetup, state: RunState) -> tuple[float, float, torch.Tensor]:
    """Update ``state.step``: schedule, batch, forward and backward, clipping, optimizer step, timing.
    Returns the loss (the global mean under ``--parallel``), the learning rate and the gradient norm."""
    job, step, opt = setup.job, state.step, setup.opt
    lr_now = lr_at(step, setup.run.lr, job.steps, job.warmup, job.min_lr_ratio)
    for g in opt.param_groups:  # Blockwise LR groups carry their multiplier of the base rate
        g["lr"] = lr_now * g.get("lr_multiplier", 1.0)
    x, y = get_batch(setup.train, setup.offsets[step], job.context)
    if setup.parallel:  # this rank's share of the global batch
        x, y = launch.shard_batch(x, setup.dist, job.parallel), launch.shard_batch(y, setup.dist, job.parallel)
    x, y = x.to(setup.device, non_blocking=True), y.to(setup.device, non_blocking=True)
    t0 = setup.fwd_timer.time()
    with autocast(setup.device, job.dtype):
        loss = job.model.loss(setup.model, x, y)
    loss.backward()
    in_backward = getattr(opt, "_backward", None)  # step_in_backward: stepped (and clipped) in backward
    if in_backward is not None:
        gnorm = None
    elif job.parallel in ("tp", "fsdp+tp"):  # plain embeddings beside DTensors: torch's clipping refuses the mix
        gnorm = launch.grad_norm(setup.params, job.grad_clip)
    elif job.grad_clip > 0:
        gnorm = torch.nn.utils.clip_grad_norm_(setup.params, job.grad_clip)
    else:
        gnorm = torch.nn.utils.get_total_norm([p.grad for p in setup.params if p.grad is not None])
    t1 = setup.fwd_timer.time()
    opt.step()
    t2 = setup.opt_timer.time()
    if in_backward is not None:
        gnorm = torch.tensor(in_backward.previous_norm)  # this step's, measured in backward
    opt.zero_grad(set_to_none=True)
    # the state's size after every step, outside the timed part: calibration windows and plan switches
    # change it during the run, and memory is what the run needed at its largest
    state.peak_state_bytes = max(state.peak_state_bytes, optimizer_state_bytes(opt))
    setup.fwd_timer.add(t1 - t0)
    setup.opt_timer.add(t2 - t1)
    state.train_time_s += t2 - t0
    state.step = step + 1
    lv = launch.all_reduce_mean(loss) if setup.parallel else loss.item()  # every rank: the global mean
    return lv, lr_now, gnorm


def _evaluate_run(setup: RunSetup, state: RunState) -> float:
    """The held-out loss now (timed into ``state.eval_time_s``)."""
    t0 = time.perf_counter()
    job = setup.job
    # every rank evaluates the same windows (FSDP2's forward is collective)
    v = _evaluate(setup.model, job.model, setup.val, setup.val_offsets, job.batch_size, job.context, setup.device,
                  job.dtype)
    if setup.parallel:
        v = launch.all_reduce_mean(v)  # equal on every rank; reduced so all agree on divergence
    state.eval_time_s += time.perf_counter() - t0
    return v


def _log_line(setup: RunSetup, state: RunState, step: int, **kw: Any) -> dict[str, Any]:
    run = setup.run
    return {"run": run.run_id, "optimizer": run.optimizer, "lr": run.lr, "seed": run.seed, "step": step,
            "tokens": step * setup.tokens_per_step, "time_s": round(state.train_time_s, 4), **kw}


def _train(setup: RunSetup, state: RunState, emit: Emit) -> None:
    """The loop, from ``state.step`` to the end of the run (or its divergence): steps, logged lines,
    evaluations, checkpoints. Adds this segment's wall time to the state."""
    job, run = setup.job, setup.run
    log_every = max(1, job.steps // 100)
    seg_start = time.perf_counter()
    acc_loss, acc_n = 0.0, 0
    emit({"type": "start", "run_id": run.run_id, "step": state.step, "steps": job.steps})

    # under --parallel rank 0 alone writes; the others keep no file
    with (open(setup.metrics_path, "a", encoding="utf-8") if setup.is_main else contextlib.nullcontext()) as mf:
        def write(rec: dict[str, Any]) -> None:
            if mf is not None:
                mf.write(json.dumps(rec) + "\n")
                mf.flush()

        if state.step == 0:
            v = _evaluate_run(setup, state)
            state.last_val = v
            write(_log_line(setup, state, 0, val_loss=_json_num(v), lr_now=0.0))
        setup.model.train()
        while state.step < job.steps and not state.diverged:
            lv, lr_now, gnorm = _train_step(setup, state)
            step = state.step
            if not math.isfinite(lv):
                state.diverged, state.diverged_step = True, step
                write(_log_line(setup, state, step, train_loss=None, diverged=True, lr_now=lr_now))
                break
            acc_loss += lv
            acc_n += 1
            state.last_train = lv
            rec: dict[str, Any] | None = None
            if step % log_every == 0 or step == job.steps:
                gn = gnorm.full_tensor() if hasattr(gnorm, "full_tensor") else gnorm  # FSDP2: a DTensor
                rec = _log_line(setup, state, step, train_loss=acc_loss / acc_n, lr_now=lr_now,
                                grad_norm=_json_num(float(gn)))
                acc_loss, acc_n = 0.0, 0
            if step % job.eval_every == 0 or step == job.steps:
                v = _evaluate_run(setup, state)
                state.last_val = v
                if not math.isfinite(v):
                    state.diverged, state.diverged_step = True, step
                else:
                    state.best_val = v if state.best_val is None else min(state.best_val, v)
                rec = rec or _log_line(setup, state, step, lr_now=lr_now)
                rec["val_loss"] = _json_num(v)
                if state.diverged:
                    rec["diverged"] = True
            if rec is not None:
                write(rec)
                emit({"type": "step", "run_id": run.run_id, "step": step, "steps": job.steps,
                      "train_loss": rec.get("train_loss"), "val_loss": rec.get("val_loss")})
            if _checkpoint_due(setup, state) and _save_checkpoint(setup, state, seg_start):
                emit({"type": "checkpoint", "run_id": run.run_id, "step": step})
    state.wall_time_s += time.perf_counter() - seg_start


def _checkpoint_due(setup: RunSetup, state: RunState) -> bool:
    """Every ``checkpoint_every`` steps, not at the end, not after divergence, never under ``--parallel``."""
    every, step = setup.job.checkpoint_every, state.step
    return bool(every and not setup.parallel and step % every == 0 and step < setup.job.steps and not state.diverged)


def _save_checkpoint(setup: RunSetup, state: RunState, seg_start: float) -> bool:
    """Write ``checkpoint.pt`` (format 2: tensors and plain values only, so ``--resume`` loads it with
    ``weights_only=True``). An optimizer whose state holds other objects gets no checkpoint (a warning,
    once): its run goes on, and ``--resume`` restarts it. Returns whether it wrote."""
    snapshot = dataclasses.replace(state, fwd_bwd=list(setup.fwd_timer.samples),
                                   opt_step=list(setup.opt_timer.samples),
                                   wall_time_s=state.wall_time_s + time.perf_counter() - seg_start)
    ck = make_checkpoint(setup.model.state_dict(), setup.opt.state_dict(), snapshot, get_rng(setup.device))
    bad = unsafe_objects(ck)
    if bad:
        if not setup.checkpoint_warned:
            setup.checkpoint_warned = True
            log.warning("run %s: no checkpoint: the optimizer state holds objects that torch.load(weights_only="
                        "True) cannot read (%s); --resume would restart this run", setup.run.run_id, "; ".join(bad))
        return False
    _atomic_torch_save(ck, setup.ckpt_path)
    return True


def _run_result(setup: RunSetup, state: RunState) -> dict[str, Any]:
    """The run's result.json: losses, time, throughput, memory, state bytes."""
    job, run, device, opt, inner = setup.job, setup.run, setup.device, setup.opt, setup.inner
    peak, peak_kind = peak_memory(device)
    if not job.isolated and peak_kind == "process_peak_rss":
        peak_kind = "process_peak_rss_shared"  # several runs in one process: a running maximum
    tokens = state.step * setup.tokens_per_step
    final_val = None if state.diverged else state.last_val
    result = {
        "run_id": run.run_id,
        "optimizer": run.optimizer,
        "label": run.label,
        "lr": run.lr,
        "seed": run.seed,
        "status": "diverged" if state.diverged else "ok",
        "diverged": state.diverged,
        "diverged_step": state.diverged_step,
        "final_val_loss": _json_num(final_val),
        "best_val_loss": _json_num(state.best_val),
        "final_train_loss": _json_num(state.last_train),
        "steps": state.step,
        "tokens": tokens,
        "train_time_s": state.train_time_s,
        "eval_time_s": state.eval_time_s,
        "wall_time_s": state.wall_time_s,
        "tokens_per_s": tokens / state.train_time_s if state.train_time_s > 0 else None,
        "step_ms": setup.opt_timer.mean_ms(),
        "step_ms_median": setup.opt_timer.median_ms(),
        "fwd_bwd_ms": setup.fwd_timer.mean_ms(),
        "state_bytes": optimizer_state_bytes(opt),  # at the end; under --parallel: this rank's (rank 0's) shards
        "peak_state_bytes": max(state.peak_state_bytes, optimizer_state_bytes(opt)),  # the largest after any step
        "param_bytes": param_bytes(inner),  # the whole model's (DTensor shapes are global)
        "params": sum(p.numel() for p in inner.parameters()),
        "peak_mem_bytes": peak,
        "peak_mem_kind": peak_kind,
        "baseline_mem_bytes": setup.baseline_rss if device.type == "cpu" else None,
        "resumed_from_step": state.resumed_from,
        "segments": state.segments,
        "optimizer_class": type(opt).__name__,
        "kernel_load_s": setup.kernel_load_s,
        **_snr_summary(opt),
    }
    if setup.parallel:
        result.update(parallel=job.parallel, world_size=setup.dist.world_size, state_bytes_scope="per_rank",
                      peak_mem_scope="rank0")
    return result


def _finish_run(setup: RunSetup, result: dict[str, Any], emit: Emit) -> None:
    """Write result.json (the run is then never repeated), drop the checkpoint, report the end."""
    atomic_write_text(setup.run_dir / "result.json", json.dumps(result, indent=1))
    with contextlib.suppress(FileNotFoundError):
        setup.ckpt_path.unlink()
    emit({"type": "end", "run_id": setup.run.run_id, "result": result})


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
        slot = by_role.setdefault(rule_key(calib.structural[e.name]), {})  # the role of its structure
        slot[kind] = slot.get(kind, 0) + 1
    return {"snr_calibrate_steps": calib.window, "snr_phase": calib.phase, "snr_blocks_by_role": by_role,
            "snr_plan_blocks": plan.num_blocks}


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

