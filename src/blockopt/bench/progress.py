"""Live progress of a sweep for the CLI: a rich display on a terminal, plain lines otherwise.

Both write to stderr (stdout carries the results table or JSON). They consume the
events that :func:`blockopt.bench.runner.run_sweep` emits.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any, TextIO

__all__ = ["NullProgress", "PlainProgress", "RichProgress", "make_progress"]


def _fmt_s(s: float | None) -> str:
    if s is None or math.isnan(s) or s < 0:
        return "?"
    s = round(s)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def _loss_text(ev: dict[str, Any], last: dict[str, Any]) -> str:
    parts = []
    tl = ev.get("train_loss", last.get("train_loss"))
    vl = ev.get("val_loss") if ev.get("val_loss") is not None else last.get("val_loss")
    if tl is not None:
        parts.append(f"loss {tl:.3f}")
    if vl is not None:
        parts.append(f"held-out {vl:.3f}")
    return "  ".join(parts)


def _run_line(res: dict[str, Any]) -> str:
    st = res.get("status")
    if st == "ok":
        return (f"held-out {res['final_val_loss']:.4f}  {res.get('tokens_per_s') or 0:,.0f} tok/s  "
                f"{res.get('wall_time_s') or 0:.1f} s")
    if st == "diverged":
        return f"diverged at step {res.get('diverged_step')}"
    return f"failed: {res.get('error')}"


class NullProgress:
    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def __call__(self, ev: dict[str, Any]) -> None:
        return None


class _Tracker:
    """Counts steps across the sweep for the overall ETA (steps of skipped runs do not count as speed)."""

    def __init__(self) -> None:
        self.total_runs = 0
        self.steps = 0
        self.done_steps = 0  # steps completed in this session, for the rate
        self.left_steps = 0
        self.t0: float | None = None
        self.run_step0 = 0
        self.run_label = ""
        self.last: dict[str, Any] = {}

    def eta(self) -> float | None:
        if not self.t0 or self.done_steps <= 0:
            return None
        rate = (time.perf_counter() - self.t0) / self.done_steps
        return rate * self.left_steps


class PlainProgress(_Tracker):
    """One line per run start/end and about ten per run in between."""

    def __init__(self, stream: TextIO | None = None) -> None:
        super().__init__()
        self.stream = stream or sys.stderr
        self.next_report = 0
        self.prev_step = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def _p(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def __call__(self, ev: dict[str, Any]) -> None:
        t = ev["type"]
        if t == "phase":
            self._p(ev["text"])
        elif t == "sweep_start":
            self.total_runs, self.steps = ev["runs"], ev["steps"]
            self.left_steps = (ev["runs"] - ev["finished"]) * ev["steps"]
            c = ev["corpus"]
            self._p(f"corpus: {c['train_tokens']:,} train / {c['val_tokens']:,} held-out tokens "
                    f"({c['tokenizer']}, vocab {c['vocab_size']:,}); {ev['runs']} runs"
                    + (f", {ev['finished']} already finished" if ev["finished"] else ""))
            self.t0 = time.perf_counter()
        elif t == "skip":
            self._p(f"[{ev['index'] + 1}/{self.total_runs}] {ev['run_id']}: finished before, kept")
        elif t == "run_start":
            self.run_label = f"[{ev['index'] + 1}/{self.total_runs}] {ev['label']} lr={ev['lr']:.3g} seed={ev['seed']}"
            self.last = {}
            self.prev_step = 0
            self.next_report = 0
            self._p(self.run_label)
        elif t == "start":
            if ev["step"]:
                self._p(f"  resumed at step {ev['step']}")
                self.left_steps -= ev["step"]
            self.prev_step = ev["step"]
            self.next_report = ev["step"] + max(1, ev["steps"] // 10)
        elif t == "step":
            d = ev["step"] - self.prev_step
            self.prev_step = ev["step"]
            self.done_steps += d
            self.left_steps -= d
            for k in ("train_loss", "val_loss"):
                if ev.get(k) is not None:
                    self.last[k] = ev[k]
            if ev["step"] >= self.next_report or ev["step"] == ev["steps"]:
                self.next_report = ev["step"] + max(1, ev["steps"] // 10)
                self._p(f"  step {ev['step']:>{len(str(ev['steps']))}}/{ev['steps']}  {_loss_text(ev, self.last)}"
                        f"  eta {_fmt_s(self.eta())}")
        elif t == "run_end":
            self.left_steps -= max(0, self.steps - self.prev_step) if ev["result"].get("status") != "ok" else 0
            self._p(f"  -> {_run_line(ev['result'])}")


class RichProgress(_Tracker):
    """A rich live display: the sweep's progress bar with ETA, and the current run's bar with its loss."""

    def __init__(self) -> None:
        super().__init__()
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.console = Console(stderr=True)
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(bar_width=28),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            TextColumn("eta {task.fields[eta]}"),
            console=self.console,
            transient=False,
        )
        self.sweep_task = None
        self.run_task = None
        self.prev_step = 0

    def __enter__(self):
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def __call__(self, ev: dict[str, Any]) -> None:
        t = ev["type"]
        p = self.progress
        if t == "phase":
            self.console.print(ev["text"], highlight=False)
        elif t == "sweep_start":
            self.total_runs, self.steps = ev["runs"], ev["steps"]
            self.left_steps = (ev["runs"] - ev["finished"]) * ev["steps"]
            c = ev["corpus"]
            self.console.print(f"corpus: {c['train_tokens']:,} train / {c['val_tokens']:,} held-out tokens "
                               f"({c['tokenizer']}, vocab {c['vocab_size']:,})", highlight=False)
            self.sweep_task = p.add_task("sweep", total=ev["runs"] * ev["steps"],
                                         completed=ev["finished"] * ev["steps"], info=f"{ev['runs']} runs", eta="?")
            self.t0 = time.perf_counter()
        elif t == "skip":
            self.console.print(f"[{ev['index'] + 1}/{self.total_runs}] {ev['run_id']}: finished before, kept",
                               highlight=False)
        elif t == "run_start":
            self.last = {}
            self.prev_step = 0
            label = f"[{ev['index'] + 1}/{self.total_runs}] {ev['label']} lr={ev['lr']:.3g} s{ev['seed']}"
            self.run_label = label
            self.run_task = p.add_task(label, total=ev["steps"], info="", eta="?")
        elif t == "start" and self.run_task is not None:
            if ev["step"]:
                self.left_steps -= ev["step"]
                p.update(self.sweep_task, advance=ev["step"])
            self.prev_step = ev["step"]
            p.update(self.run_task, completed=ev["step"], info="resumed" if ev["step"] else "")
        elif t == "step" and self.run_task is not None:
            d = ev["step"] - self.prev_step
            self.prev_step = ev["step"]
            self.done_steps += d
            self.left_steps -= d
            for k in ("train_loss", "val_loss"):
                if ev.get(k) is not None:
                    self.last[k] = ev[k]
            eta = _fmt_s(self.eta())
            p.update(self.run_task, completed=ev["step"], info=_loss_text(ev, self.last), eta="")
            p.update(self.sweep_task, advance=d, eta=eta)
        elif t == "run_end":
            res = ev["result"]
            if res.get("status") != "ok":
                rest = max(0, self.steps - self.prev_step)
                self.left_steps -= rest
                if self.sweep_task is not None:
                    p.update(self.sweep_task, advance=rest)
            if self.run_task is not None:
                p.update(self.run_task, info=_run_line(res), eta="")
                p.stop_task(self.run_task)


def make_progress(mode: str = "auto"):
    """``auto``: rich on a terminal when rich is installed, plain lines otherwise; ``plain``; ``none``."""
    if mode == "none":
        return NullProgress()
    if mode == "auto" and sys.stderr.isatty():
        try:
            return RichProgress()
        except ImportError:
            pass
    return PlainProgress()
