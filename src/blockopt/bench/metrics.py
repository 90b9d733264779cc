"""What the bench measures, and how: state bytes, memory, timing, environment, aggregation."""

from __future__ import annotations

import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from ..utils import atomic_write_text, fmt_bytes  # noqa: F401  (re-exported)

__all__ = [
    "StepTimer",
    "aggregate",
    "current_rss_bytes",
    "environment",
    "fmt_bytes",
    "optimizer_state_bytes",
    "param_bytes",
    "peak_memory",
    "peak_rss_bytes",
    "reset_peak_memory",
    "steps_to_reference_loss",
]


# --- memory -----------------------------------------------------------------------------
def _tensors(obj: Any) -> Iterable[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        # a DTensor (FSDP2): this rank's shard
        yield obj.to_local() if hasattr(obj, "to_local") and hasattr(obj, "placements") else obj
    elif isinstance(obj, Mapping):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def optimizer_state_bytes(optimizer: Any) -> int:
    """Bytes held by the tensors in ``optimizer.state`` (what the optimizer really allocated).

    Each storage is counted once, so views (the official Adam-mini keeps ``m`` as a
    view) and shared tensors are not counted twice.
    """
    seen: dict[tuple[str, int], int] = {}
    for st in optimizer.state.values():
        for t in _tensors(st):
            if t.is_meta:
                continue
            s = t.untyped_storage()
            seen[(str(t.device), s.data_ptr())] = s.nbytes()
    return sum(seen.values())


def param_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def current_rss_bytes() -> int | None:
    """Resident set size now (Linux ``/proc``); ``None`` where unknown."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def peak_rss_bytes() -> int | None:
    """Peak resident set size of this process so far (``ru_maxrss``; monotonic, process-wide)."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r) if sys.platform == "darwin" else int(r) * 1024


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> tuple[int | None, str]:
    """``(bytes, kind)``: CUDA peak allocated on GPU, process peak RSS on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda_max_allocated"
    return peak_rss_bytes(), "process_peak_rss"


# --- timing -------------------------------------------------------------------------------
class StepTimer:
    """Wall-clock sections, synchronised on CUDA. ``skip`` first samples are warm-up and not
    averaged (state allocation, allocator growth)."""

    def __init__(self, device: torch.device, skip: int = 3) -> None:
        self.device = device
        self.skip = skip
        self.samples: list[float] = []

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def time(self) -> float:
        self.sync()
        return time.perf_counter()

    def add(self, seconds: float) -> None:
        self.samples.append(seconds)

    def mean_ms(self) -> float | None:
        xs = self.samples[self.skip:] or self.samples
        return 1000 * statistics.fmean(xs) if xs else None

    def median_ms(self) -> float | None:
        xs = self.samples[self.skip:] or self.samples
        return 1000 * statistics.median(xs) if xs else None


# --- environment ----------------------------------------------------------------------------
def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def environment(device: torch.device, dtype: str, threads: int) -> dict[str, Any]:
    from .. import __version__

    env = {
        "blockopt": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
        "cpus": available_cpus(),
        "threads": threads,
        "dtype": dtype,
    }
    if device.type == "cuda":
        env["cuda"] = torch.version.cuda
    return env


# --- aggregation ---------------------------------------------------------------------------
def _mean(xs: Sequence[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.fmean(xs) if xs else None


def _std(xs: Sequence[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.stdev(xs) if len(xs) > 1 else (0.0 if xs else None)


def aggregate(runs: Sequence[Mapping[str, Any]], optimizer_order: Sequence[str],
              lr_grids: Mapping[str, Sequence[float]]) -> dict[str, Any]:
    """Per optimizer: the mean final held-out loss of each learning rate over seeds, the
    winning learning rate (lowest mean; a learning rate with a diverged or failed seed
    counts as infinitely bad), and the winner's measurements, with ratios against AdamW."""
    sweeps: dict[str, list[dict[str, Any]]] = {}
    winners: list[dict[str, Any]] = []
    for opt in optimizer_order:
        rows = []
        for lr in lr_grids[opt]:
            rs = [r for r in runs if r["optimizer"] == opt and math.isclose(r["lr"], lr, rel_tol=1e-12)]
            losses = [r.get("final_val_loss") for r in rs]
            bad = sum(1 for r in rs if r.get("status") != "ok")
            ok = [x for x in losses if x is not None and math.isfinite(x)]
            rows.append({
                "lr": lr,
                "runs": len(rs),
                "failed": bad,
                "final_val_loss_mean": _mean(ok) if not bad and ok else None,
                "final_val_loss_std": _std(ok) if not bad and ok else None,
                "per_seed": {str(r["seed"]): r.get("final_val_loss") for r in rs},
            })
        sweeps[opt] = rows
        scored = [r for r in rows if r["final_val_loss_mean"] is not None]
        best = min(scored, key=lambda r: r["final_val_loss_mean"]) if scored else None
        rs = [r for r in runs if r["optimizer"] == opt and best is not None
              and math.isclose(r["lr"], best["lr"], rel_tol=1e-12)]
        grid = sorted(lr_grids[opt])
        w: dict[str, Any] = {
            "optimizer": opt,
            "label": next((r.get("label") for r in runs if r["optimizer"] == opt), opt),
            "best_lr": best["lr"] if best else None,
            "lr_grid": list(lr_grids[opt]),
            "best_lr_at_edge": bool(best and len(grid) > 1 and best["lr"] in (grid[0], grid[-1])),
            "final_val_loss": best["final_val_loss_mean"] if best else None,
            "final_val_loss_std": best["final_val_loss_std"] if best else None,
            "seeds": len(rs),
            "all_failed": best is None,
        }
        for k in ("state_bytes", "peak_state_bytes", "tokens_per_s", "step_ms", "fwd_bwd_ms", "peak_mem_bytes",
                  "train_time_s", "param_bytes"):
            w[k] = _mean([r.get(k) for r in rs])
        winners.append(w)
    base = next((w for w in winners if w["optimizer"] == "adamw" and not w["all_failed"]), None)
    for w in winners:
        ratios = {}
        if base is not None:
            for k, name in (("final_val_loss", "val_loss"), ("state_bytes", "state_bytes"),
                            ("peak_state_bytes", "peak_state_bytes"),
                            ("step_ms", "step_ms"), ("tokens_per_s", "tokens_per_s"),
                            ("peak_mem_bytes", "peak_mem")):
                a, b = w.get(k), base.get(k)
                ratios[name] = (a / b) if (a is not None and b) else None
        w["vs_adamw"] = ratios
    return {"winners": winners, "lr_sweeps": sweeps}


def steps_to_reference_loss(winners: Sequence[Mapping[str, Any]], runs: Sequence[Mapping[str, Any]],
                            records: Sequence[Mapping[str, Any]], reference: str = "adamw") -> dict[str, Any]:
    """For each optimizer at its best learning rate: the first evaluation step at which its held-out
    loss (mean over its seeds, at steps every seed logged) is at or below the ``reference``
    optimizer's final held-out loss at its best learning rate.

    ``winners`` and ``runs`` as in the summary, ``records`` the logged ``metrics.jsonl`` lines.
    Returns ``{"reference", "target", "steps": {optimizer: step or None}}``; ``None`` means never
    (or no target: the reference is absent or failed everywhere).
    """
    ref = next((w for w in winners if w["optimizer"] == reference and not w.get("all_failed")), None)
    target = ref["final_val_loss"] if ref is not None else None
    steps: dict[str, int | None] = {}
    for w in winners:
        first = None
        if target is not None and w.get("best_lr") is not None:
            ids = {r["run_id"] for r in runs if r["optimizer"] == w["optimizer"]
                   and math.isclose(r["lr"], w["best_lr"], rel_tol=1e-12) and r.get("status") == "ok"}
            by_step: dict[int, dict[str, float]] = {}
            for rec in records:
                if rec.get("run") in ids and rec.get("val_loss") is not None:
                    by_step.setdefault(int(rec["step"]), {})[rec["run"]] = float(rec["val_loss"])
            for step in sorted(by_step):
                vals = by_step[step]
                if ids and set(vals) == ids and sum(vals.values()) / len(vals) <= target:
                    first = step
                    break
        steps[w["optimizer"]] = first
    return {"reference": reference, "target": target, "steps": steps}




