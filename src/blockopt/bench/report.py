"""report.md and PNG plots from a finished sweep's summary and logged steps."""

from __future__ import annotations

import logging
import math
import os
import shlex
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..utils import atomic_write, atomic_write_text
from .metrics import fmt_bytes

__all__ = ["PLOT_FILES", "results_table", "side_by_side_table", "write_report"]

log = logging.getLogger(__name__)

PLOT_FILES = {
    "loss_vs_steps": "loss_vs_steps.png",
    "loss_vs_time": "loss_vs_time.png",
    "memory": "memory.png",
    "lr_sweep": "lr_sweep.png",
}


def _f(x: float | None, spec: str = ".4f") -> str:
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def _ratio(x: float | None, pct: bool = False) -> str:
    if x is None:
        return "-"
    return f"{(x - 1) * 100:+.2f} %" if pct else f"{x:.2f}x"


def _steps_to(summary: Mapping[str, Any], opt: str) -> str | None:
    """First evaluation step at or below AdamW's final held-out loss (``never``); None: not in the summary."""
    info = summary.get("steps_to_adamw_loss")
    if not info or info.get("target") is None:
        return None
    step = info["steps"].get(opt)
    return "never" if step is None else str(step)


def _in_backward(w: Mapping[str, Any]) -> bool:
    """A ``step_in_backward=true`` row: ``optimizer.step()`` does nothing; the step's time is in backward."""
    return "step_in_backward=true" in w["optimizer"]


def results_table(summary: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the winners table (shared by report.md and the CLI)."""
    header = ["optimizer", "best lr", "held-out loss", "vs AdamW", "state (end)", "state (peak)", "vs AdamW",
              "opt step ms", "vs AdamW", "tokens/s", "peak mem"]
    with_steps = _steps_to(summary, "adamw") is not None
    if with_steps:
        header.insert(4, "steps to AdamW loss")
    rows = []
    for w in summary["winners"]:
        r = w.get("vs_adamw") or {}
        loss = _f(w["final_val_loss"])
        if w.get("seeds", 0) > 1 and w.get("final_val_loss_std") is not None:
            loss += f" ± {w['final_val_loss_std']:.4f}"
        if w["all_failed"]:
            loss = "diverged/failed"
        rows.append([
            w["label"],
            _f(w["best_lr"], ".3g"),
            loss,
            _ratio(r.get("val_loss"), pct=True) if w["optimizer"] != "adamw" else "",
            fmt_bytes(w["state_bytes"]),
            fmt_bytes(w.get("peak_state_bytes")),  # the measure of memory: the largest the state was during the run
            _ratio(r.get("peak_state_bytes")) if w["optimizer"] != "adamw" else "",
            *(("in backward", "") if _in_backward(w) else
              (_f(w["step_ms"], ".2f"), _ratio(r.get("step_ms")) if w["optimizer"] != "adamw" else "")),
            _f(w["tokens_per_s"], ",.0f"),
            fmt_bytes(w["peak_mem_bytes"]),
        ])
        if with_steps:
            rows[-1].insert(4, _steps_to(summary, w["optimizer"]))
    return header, rows


def side_by_side_table(summary: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The winners with one column per optimizer (AdamW first), ratios against AdamW in brackets."""
    ws = sorted(summary["winners"], key=lambda w: w["optimizer"] != "adamw")
    header = ["", *[w["label"] for w in ws]]

    def cell(w: Mapping[str, Any], value: str, ratio_key: str, pct: bool = False) -> str:
        r = (w.get("vs_adamw") or {}).get(ratio_key)
        if w["optimizer"] == "adamw" or r is None or value == "-":
            return value
        return f"{value} ({_ratio(r, pct=pct)})"

    rows = [
        ["best lr", *[_f(w["best_lr"], ".3g") for w in ws]],
        ["held-out loss", *[("diverged/failed" if w["all_failed"] else cell(w, _f(w["final_val_loss"]), "val_loss",
                                                                               pct=True)) for w in ws]],
        ["optimizer state (end)", *[cell(w, fmt_bytes(w["state_bytes"]), "state_bytes") for w in ws]],
        ["optimizer state (peak)", *[cell(w, fmt_bytes(w.get("peak_state_bytes")), "peak_state_bytes") for w in ws]],
        ["opt step", *["in backward" if _in_backward(w) else
                       cell(w, _f(w["step_ms"], ".2f") + " ms" if w["step_ms"] is not None else "-", "step_ms")
                       for w in ws]],
        ["tokens/s", *[cell(w, _f(w["tokens_per_s"], ",.0f"), "tokens_per_s") for w in ws]],
        ["peak memory", *[cell(w, fmt_bytes(w["peak_mem_bytes"]), "peak_mem") for w in ws]],
    ]
    if _steps_to(summary, "adamw") is not None:
        rows.insert(2, ["steps to AdamW loss", *[_steps_to(summary, w["optimizer"]) for w in ws]])
    if any(w.get("seeds", 0) > 1 for w in ws):
        rows.insert(2, ["  std over seeds", *[_f(w.get("final_val_loss_std")) for w in ws]])
    return header, rows


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)




# --- plots --------------------------------------------------------------------------------
def _curves(records: Sequence[Mapping[str, Any]], run_ids: set[str], key: str, x: str):
    """Mean over the given runs of ``key`` at each ``x`` logged by all of them."""
    by: dict[float, list[float]] = defaultdict(list)
    for r in records:
        if r.get("run") in run_ids and r.get(key) is not None:
            by[r[x]].append(r[key])
    xs = sorted(by)
    return xs, [sum(by[k]) / len(by[k]) for k in xs]


def _winner_runs(summary: Mapping[str, Any]) -> dict[str, tuple[str, set[str]]]:
    out = {}
    for w in summary["winners"]:
        if w["best_lr"] is None:
            continue
        ids = {r["run_id"] for r in summary["runs"]
               if r["optimizer"] == w["optimizer"] and math.isclose(r["lr"], w["best_lr"], rel_tol=1e-12)}
        out[w["optimizer"]] = (f"{w['label']} (lr {w['best_lr']:.3g})", ids)
    return out


def _savefig(fig, path: Path) -> None:
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110, bbox_inches="tight"))


def write_plots(out: Path, summary: Mapping[str, Any], records: Sequence[Mapping[str, Any]]) -> list[str]:
    """The PNGs; returns the file names written."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state

    written = []
    winners = _winner_runs(summary)
    colors = {opt: f"C{i}" for i, opt in enumerate(w["optimizer"] for w in summary["winners"])}

    for name, x, xlabel in (("loss_vs_steps", "step", "step"), ("loss_vs_time", "time_s", "training time (s)")):
        fig = Figure(figsize=(7, 4.2))
        ax = fig.add_subplot()
        for opt, (label, ids) in winners.items():
            xs, ys = _curves(records, ids, "train_loss", x)
            if xs:
                ax.plot(xs, ys, color=colors[opt], alpha=0.35, linewidth=1)
            xs, ys = _curves(records, ids, "val_loss", x)
            if xs:
                ax.plot(xs, ys, color=colors[opt], marker="o", markersize=3, label=f"{label} held-out")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("loss (nats/token)")
        ax.set_title("held-out loss (markers) and training loss (faint), best lr per optimizer")
        ax.title.set_fontsize(9)
        ids = set().union(*(i for _, i in winners.values())) if winners else set()
        mine = [r for r in records if r.get("run") in ids]
        first_eval = min((r["step"] for r in mine if r.get("val_loss") is not None and r["step"] > 0), default=0)
        vals = [r["val_loss"] for r in mine if r.get("val_loss") is not None and r["step"] > 0]
        lows = vals + [r["train_loss"] for r in mine if r.get("train_loss") is not None and r["step"] >= first_eval]
        if vals:  # do not let the step-0 loss squash the interesting part
            lo, hi = min(lows), max(vals)
            ax.set_ylim(lo - 0.05 * (hi - lo + 1e-9), hi + 0.25 * (hi - lo + 1e-9))
        ax.grid(alpha=0.3)
        if winners:
            ax.legend(fontsize=8)
        _savefig(fig, out / PLOT_FILES[name])
        written.append(PLOT_FILES[name])

    fig = Figure(figsize=(8, 3.6))
    ws = [w for w in summary["winners"] if not w["all_failed"]]
    labels = [w["label"] for w in ws]
    panels = (("peak_state_bytes", "optimizer state, peak over the run (MiB)"),
              ("peak_mem_bytes", _peak_title(summary)))
    for i, (key, title) in enumerate(panels):
        ax = fig.add_subplot(1, 2, i + 1)
        vals = [(w.get(key) or 0) / 2**20 for w in ws]
        bars = ax.bar(range(len(ws)), vals, color=[colors[w["optimizer"]] for w in ws])
        ax.set_xticks(range(len(ws)), labels, rotation=20, ha="right", fontsize=8)
        ax.set_title(title, fontsize=9)
        for b, v in zip(bars, vals):
            ax.annotate(f"{v:.1f}", (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom",
                        fontsize=7)
    _savefig(fig, out / PLOT_FILES["memory"])
    written.append(PLOT_FILES["memory"])

    if any(len(rows) > 1 for rows in summary["lr_sweeps"].values()):
        fig = Figure(figsize=(6, 4))
        ax = fig.add_subplot()
        for w in summary["winners"]:
            rows = summary["lr_sweeps"][w["optimizer"]]
            pts = sorted((r["lr"], r["final_val_loss_mean"]) for r in rows if r["final_val_loss_mean"] is not None)
            if pts:
                ax.plot(*zip(*pts), marker="o", color=colors[w["optimizer"]], label=w["label"])
        ax.set_xscale("log")
        ax.set_xlabel("peak learning rate")
        ax.set_ylabel("final held-out loss (mean over seeds)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        _savefig(fig, out / PLOT_FILES["lr_sweep"])
        written.append(PLOT_FILES["lr_sweep"])
    return written


def _peak_title(summary: Mapping[str, Any]) -> str:
    kinds = {r.get("peak_mem_kind") for r in summary["runs"]}
    if "cuda_max_allocated" in kinds:
        return "peak CUDA memory allocated (MiB)"
    return "peak process RSS (MiB)"


# --- report.md ----------------------------------------------------------------------------
def _memory_note(summary: Mapping[str, Any]) -> str:
    kinds = {r.get("peak_mem_kind") for r in summary["runs"] if r.get("peak_mem_kind")}
    if "cuda_max_allocated" in kinds:
        return ("Peak memory is `torch.cuda.max_memory_allocated()` during the run (reset at its start): "
                "weights, gradients, activations and optimizer state.")
    if "process_peak_rss_shared" in kinds:
        return ("Peak memory is the process's peak resident set size (`ru_maxrss`). The runs shared one "
                "process (`--isolate none`), and `ru_maxrss` is process-wide and never decreases, so each "
                "run's value is the maximum over itself **and every run before it**: compare the optimizer "
                "state column instead, or run with `--isolate process`.")
    base = [r.get("baseline_mem_bytes") for r in summary["runs"] if r.get("baseline_mem_bytes")]
    extra = f" (about {fmt_bytes(sum(base) / len(base))} of it is Python and torch before the model)" if base else ""
    return ("Peak memory is the peak resident set size (`ru_maxrss`) of the worker process that ran the run "
            f"alone{extra}; on CPU it includes the interpreter, torch and the allocator's slack, so differences "
            "between optimizers are smaller than the state column suggests.")


def write_report(out: Path, summary: Mapping[str, Any], records: Sequence[Mapping[str, Any]], *,
                 plots: bool = True) -> None:
    """Write ``report.md`` (and the plots) into ``out``."""
    out = Path(out)
    pngs: list[str] = []
    if plots:
        try:
            pngs = write_plots(out, summary, records)
        except ImportError:
            log.warning("matplotlib is not installed: no plots (pip install 'blockopt[bench]')")
    env, data, model, proto = summary["environment"], summary["data"], summary["model"], summary["protocol"]
    hyper = proto["hyper"]
    lines: list[str] = []
    title_model = model["name"]
    lines.append(f"# blockopt bench: {title_model} on {_short_data(data)}")
    lines.append("")
    lines.append(f"Command: `{shlex.join(summary['command'])}`  ")
    if summary.get("last_command") and summary["last_command"] != summary["command"]:
        lines.append(f"Finished by: `{shlex.join(summary['last_command'])}`  ")
    lines.append(f"Sweep `{summary['sweep_id']}`, {summary['created']}.")
    if not summary["complete"]:
        lines.append("")
        lines.append("**Incomplete:** some runs failed (see *Runs*); `--resume` retries them.")
    lines.append("")
    lines.append("## Result")
    lines.append("")
    lines.append("Each optimizer at its best learning rate (lowest final held-out loss, mean over "
                 f"{len(proto['seeds'])} seed{'s' if len(proto['seeds']) > 1 else ''}), compared at the end of "
                 "training. Ratios are against AdamW.")
    lines.append("")
    header, rows = results_table(summary)
    lines.append(_md_table(header, rows))
    lines.append("")
    notes = _notes(summary)
    for n in notes:
        lines.append(f"- {n}")
    if notes:
        lines.append("")

    lines.extend(_snr_section(summary))
    lines.append("## Learning-rate sweeps")
    lines.append("")
    for w in summary["winners"]:
        sw = summary["lr_sweeps"][w["optimizer"]]
        lines.append(f"**{w['label']}**")
        lines.append("")
        seeds = [str(s) for s in proto["seeds"]]
        hdr = ["lr", "final held-out loss (mean)"] + [f"seed {s}" for s in seeds]
        body = []
        for r in sw:
            mark = " **(best)**" if w["best_lr"] is not None and math.isclose(r["lr"], w["best_lr"]) else ""
            per = [_f(r["per_seed"].get(s)) if r["per_seed"].get(s) is not None else "diverged/failed"
                   for s in seeds]
            body.append([f"{r['lr']:.3g}{mark}", _f(r["final_val_loss_mean"]), *per])
        lines.append(_md_table(hdr, body))
        lines.append("")

    if pngs:
        lines.append("## Plots")
        lines.append("")
        for p in pngs:
            lines.append(f"![{p[:-4].replace('_', ' ')}]({p})")
            lines.append("")

    lines.append("## Setup")
    lines.append("")
    lines.append(f"- **Data**: {data['description']}; {fmt_bytes(data['used_bytes'])} used "
                 f"(of {fmt_bytes(data['total_bytes'])}), cut at newlines into {data.get('chunks')} chunks; "
                 f"{data.get('val_chunks')} interleaved chunks held out ({fmt_bytes(data['val_bytes'])}, "
                 f"{data['val_tokens']:,} tokens), training on {data['train_tokens']:,} tokens.")
    lines.append(f"- **Tokenizer**: {data['tokenizer']} (vocabulary {data['vocab_size']:,}).")
    params = model.get("params")
    lines.append(f"- **Model**: {model['name']}" + (f", {params:,} parameters" if params else "") + ".")
    lines.append(f"- **Budget**: {proto['steps']} steps x {proto['batch_size']} sequences x {proto['context']} "
                 f"tokens = {summary['tokens_per_run']:,} tokens per run, the same batches in the same order "
                 "for every optimizer (a function of the seed).")
    lines.append(f"- **Schedule**: linear warmup over {proto['warmup']} steps to the peak learning rate, cosine "
                 f"decay to {proto['min_lr_ratio']:g} x peak; gradient clipping at norm {proto['grad_clip']:g}"
                 + (" (off)" if not proto["grad_clip"] else "") + ".")
    lines.append(f"- **Hyperparameters**: betas ({hyper['beta1']:g}, {hyper['beta2']:g}), eps {hyper['eps']:g}, "
                 f"weight decay {hyper['weight_decay']:g} on the tensors Adam-mini's partition plan decays "
                 "(matrices and embeddings; not norms or biases), for every optimizer that has them.")
    lines.append(f"- **Held-out loss**: every {proto['eval_every']} steps on "
                 f"{proto['eval_batches'] * proto['batch_size']} fixed windows of {proto['context']} tokens.")
    autocast = " autocast, fp32 weights and state" if proto["dtype"] != "float32" else ""
    lines.append(f"- **Precision**: {proto['dtype']}{autocast}.")
    lines.append("")
    lines.append("Optimizers:")
    lines.append("")
    for key, o in summary["optimizers"].items():
        lines.append(f"- `{key}`: {o['description']}")
    lines.append("")

    lines.append("## Environment")
    lines.append("")
    lines.append(_md_table(["", ""], [[k, str(v)] for k, v in env.items()]))
    lines.append("")

    lines.append("## How it is measured")
    lines.append("")
    lines.append("- *state*: bytes of the tensors in `optimizer.state` after training (each storage counted once).")
    lines.append("- *opt step ms*: mean wall time of `optimizer.step()` (first 3 steps skipped"
                 + (", CUDA synchronised" if env["device"].startswith("cuda") else "") + "); forward+backward "
                 "is timed apart (*fwd+bwd ms* below); with `step_in_backward=true` the step runs inside "
                 "backward, so its time is part of fwd+bwd.")
    lines.append("- *tokens/s*: tokens trained / time in forward, backward, clipping and step (evaluation and "
                 "checkpoints excluded).")
    lines.append(f"- *peak mem*: {_memory_note(summary)}")
    loads = [r["kernel_load_s"] for r in summary["runs"] if r.get("kernel_load_s") is not None]
    if loads:
        lines.append(f"- *kernel*: blockopt's fused CPU kernel is built (first use on a machine) or loaded before each "
                     f"run's clock starts, so it is not training time: {max(loads):.2f} s at most, "
                     f"{min(loads):.2f} s at least in this sweep.")
    lines.append("- A run whose training or held-out loss becomes non-finite is recorded as diverged and stops; a "
                 "learning rate with a diverged seed cannot win.")
    lines.append("")

    lines.append("## Runs")
    lines.append("")
    hdr = ["run", "status", "final held-out", "best held-out", "steps", "train s", "tokens/s", "opt step ms",
           "fwd+bwd ms", "state (end)", "state (peak)", "peak mem"]
    body = []
    for r in summary["runs"]:
        status = r["status"]
        if r.get("diverged_step"):
            status += f" at step {r['diverged_step']}"
        if r.get("error"):
            status += f": {r['error']}"
        body.append([r["run_id"], status, _f(r.get("final_val_loss")), _f(r.get("best_val_loss")),
                     str(r.get("steps", "-")), _f(r.get("train_time_s"), ".1f"), _f(r.get("tokens_per_s"), ",.0f"),
                     _f(r.get("step_ms"), ".2f"), _f(r.get("fwd_bwd_ms"), ".1f"), fmt_bytes(r.get("state_bytes")),
                     fmt_bytes(r.get("peak_state_bytes")), fmt_bytes(r.get("peak_mem_bytes"))])
    lines.append(_md_table(hdr, body))
    lines.append("")
    lines.append("Files: `summary.json` (everything above), `metrics.jsonl` (one line per logged step), "
                 "`runs/<run>/` (per-run results).")
    lines.append("")
    atomic_write_text(out / "report.md", "\n".join(lines))


def _snr_section(summary: Mapping[str, Any]) -> list[str]:
    """For optimizers that chose their blocks from data: what they chose, per role (best lr, first seed)."""
    out: list[str] = []
    for w in summary["winners"]:
        runs = [r for r in summary["runs"] if r["optimizer"] == w["optimizer"] and r.get("snr_blocks_by_role")
                and w["best_lr"] is not None and math.isclose(r["lr"], w["best_lr"])]
        if not runs:
            continue
        r = min(runs, key=lambda r: r["seed"])
        if not out:
            out += ["## Blocks chosen from data", ""]
        out.append(f"**{w['label']}** (lr {r['lr']:.3g}, seed {r['seed']}): AdamW's per-element second moment for "
                   f"the first {r['snr_calibrate_steps']} steps, then per tensor the partition whose SNR was highest "
                   f"above the cutoff (else per element); {r['snr_plan_blocks']:,} second-moment values after the "
                   "switch. Tensors per role and block kind:")
        out.append("")
        kinds = sorted({k for by in r["snr_blocks_by_role"].values() for k in by})
        body = [[role, *[str(by.get(k, "")) for k in kinds]] for role, by in r["snr_blocks_by_role"].items()]
        out.append(_md_table(["role", *kinds], body))
        out.append("")
    return out


def _short_data(data: Mapping[str, Any]) -> str:
    if data.get("default"):
        return "the Python standard library"
    d = data["description"]
    return os.path.basename(d.rstrip("/")) or d


def _notes(summary: Mapping[str, Any]) -> list[str]:
    notes = []
    single = [w["label"] for w in summary["winners"] if len(w["lr_grid"]) == 1]
    if single:
        notes.append(f"No learning-rate sweep for {', '.join(single)} (one learning rate): the comparison is only "
                     "as fair as that choice; pass `--lrs` with several values for a fair one.")
    for w in summary["winners"]:
        if w["best_lr_at_edge"]:
            notes.append(f"{w['label']}: the best learning rate {w['best_lr']:.3g} is at the edge of its grid "
                         f"({', '.join(f'{x:.3g}' for x in sorted(w['lr_grid']))}); the optimum may lie outside.")
        if w["all_failed"]:
            notes.append(f"{w['label']}: every learning rate diverged or failed.")
    info = summary.get("steps_to_adamw_loss")
    if info and info.get("target") is not None:
        every = summary.get("protocol", {}).get("eval_every")
        notes.append(f"*steps to AdamW loss*: the first evaluation (every {every} steps) at which the held-out loss, "
                     f"at the optimizer's best learning rate, is at or below AdamW's final {info['target']:.4f}; "
                     "*never*: not within the run.")
    div = [r["run_id"] for r in summary["runs"] if r.get("status") == "diverged"]
    if div:
        notes.append(f"Diverged: {', '.join(div)}.")
    err = [r["run_id"] for r in summary["runs"] if r.get("status") == "error"]
    if err:
        notes.append(f"Failed: {', '.join(err)} (see *Runs*).")
    if not any(w["optimizer"] == "adamw" for w in summary["winners"]):
        notes.append("AdamW is not in this sweep, so there are no ratios.")
    return notes
