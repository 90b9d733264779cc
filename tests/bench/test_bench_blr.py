"""Blockwise LR in the bench: the runner's schedule applies each group's multiplier (and leaves
other optimizers alone), and the summary reports the steps to AdamW's final held-out loss."""

from __future__ import annotations

import json

import pytest
from bench_helpers import cache_dir, cli, corpus, keep_torch_threads, tiny_args  # noqa: F401 - fixtures

from blockopt.bench import runner
from blockopt.bench.metrics import steps_to_reference_loss
from blockopt.bench.runner import lr_at

PAPER = {"embedding": 10.0, "qk": 8.0, "vo": 4.0, "ffn": 6.0, "norm": 1.0}


def test_runner_schedule_scales_each_group_by_its_multiplier(cli, corpus, cache_dir, tmp_path, monkeypatch):  # noqa: F811 - pytest fixtures imported from bench_helpers
    seen: dict[str, list[list[tuple[str | None, float]]]] = {}
    real = runner.build_optimizer

    def spy(choice, model, lr, base, *, plan, info):
        opt = real(choice, model, lr, base, plan=plan, info=info)
        log = seen.setdefault(choice.key, [])
        step = opt.step

        def recording_step(*a, **kw):
            log.append([(g.get("block_type"), g["lr"]) for g in opt.param_groups])
            return step(*a, **kw)

        opt.step = recording_step
        return opt

    monkeypatch.setattr(runner, "build_optimizer", spy)
    out = tmp_path / "out"
    rc, stdout, _ = cli(tiny_args(corpus, cache_dir, out, "--optimizers", "adamw,adam-mini+blr,adamw+blr",
                                  "--lrs", "adamw=3e-3;adam-mini+blr=1e-3;adamw+blr=5e-4", "--warmup", "2",
                                  "--no-plots", "--checkpoint-every", "0"))
    assert rc == 0, stdout
    steps = 6
    for key, base in (("adamw", 3e-3), ("adam-mini+blr", 1e-3), ("adamw+blr", 5e-4)):
        log = seen[key]
        assert len(log) == steps
        for step, groups in enumerate(log):
            lr_now = lr_at(step, base, steps, 2, 0.1)
            for btype, lr in groups:
                if key == "adamw":
                    assert btype is None and lr == lr_now  # unchanged for optimizers without multipliers
                else:
                    assert lr == lr_now * PAPER[btype]
        if key != "adamw":
            assert {b for b, _ in log[0]} == set(PAPER)

    summary = json.loads((out / "summary.json").read_text())
    info = summary["steps_to_adamw_loss"]
    adamw = next(w for w in summary["winners"] if w["optimizer"] == "adamw")
    assert info["target"] == adamw["final_val_loss"]
    assert set(info["steps"]) == {"adamw", "adam-mini+blr", "adamw+blr"}
    assert info["steps"]["adamw"] is not None and info["steps"]["adamw"] <= steps  # it reaches its own final loss
    assert "steps to AdamW loss" in stdout and "steps to AdamW loss" in (out / "report.md").read_text()


def _w(opt, lr, loss, failed=False):
    return {"optimizer": opt, "best_lr": None if failed else lr, "final_val_loss": None if failed else loss,
            "all_failed": failed}


def _r(opt, lr, seed, status="ok"):
    return {"run_id": f"{opt}-{lr}-{seed}", "optimizer": opt, "lr": lr, "seed": seed, "status": status}


def _curve(run_id, points):
    return [{"run": run_id, "step": s, "val_loss": v} for s, v in points]


def test_steps_to_reference_loss_first_eval_at_or_below_the_target():
    winners = [_w("adamw", 4e-3, 2.0), _w("fast", 1e-3, 1.9), _w("slow", 2e-3, 2.1), _w("dead", 1e-3, None, True)]
    runs = [_r("adamw", 4e-3, 0), _r("fast", 1e-3, 0), _r("fast", 1e-3, 1), _r("fast", 3e-3, 0),
            _r("slow", 2e-3, 0), _r("dead", 1e-3, 0, "diverged")]
    records = (
        _curve("adamw-0.004-0", [(0, 5.5), (10, 2.5), (20, 2.1), (30, 2.0)])
        # two seeds: the mean at step 10 is 2.05 (> 2.0), at step 20 exactly 2.0 (<= target)
        + _curve("fast-0.001-0", [(0, 5.5), (10, 1.9), (20, 1.95), (30, 1.9)])
        + _curve("fast-0.001-1", [(0, 5.5), (10, 2.2), (20, 2.05), (30, 1.9)])
        # another lr of the same optimizer, lower earlier: not the winner, ignored
        + _curve("fast-0.003-0", [(10, 1.0)])
        + _curve("slow-0.002-0", [(0, 5.5), (10, 2.4), (20, 2.2), (30, 2.1)])
        + [{"run": "fast-0.001-0", "step": 5, "train_loss": 0.1}]  # a train-only line
    )
    got = steps_to_reference_loss(winners, runs, records)
    assert got == {"reference": "adamw", "target": 2.0,
                   "steps": {"adamw": 30, "fast": 20, "slow": None, "dead": None}}
    # a step that only one seed logged does not count
    partial = records + [{"run": "fast-0.001-0", "step": 15, "val_loss": 0.5}]
    assert steps_to_reference_loss(winners, runs, partial)["steps"]["fast"] == 20
    # no AdamW: no target, nothing reached
    none = steps_to_reference_loss(winners[1:], runs, records)
    assert none["target"] is None and set(none["steps"].values()) == {None}


@pytest.mark.parametrize("name", ["adamw+blr", "adam-mini+blr"])
def test_registry_lists_blr(name):
    from blockopt.bench.optimizers import REGISTRY, parse_optimizer

    assert name in REGISTRY and parse_optimizer(name).spec.name == name


def test_default_with_blr_has_the_default_blocks_and_the_paper_multipliers():
    from blockopt import AdamMini
    from blockopt.bench.optimizers import Hyper, build_optimizer, parse_optimizer
    from blockopt.models import build_model

    model = build_model("llama-micro", vocab_size=256, seed=0)
    choice = parse_optimizer("adam-mini-default+blr:momentum_dtype=int8")
    opt = build_optimizer(choice, model, 1e-3, Hyper(weight_decay=0.1), plan=None, info={})
    default = AdamMini(model, lr=1e-3).plan
    assert {n: e.describe() for n, e in opt.plan.items()} == {n: e.describe() for n, e in default.items()}
    assert any(e.describe().startswith("factored") for e in opt.plan.values())  # the default factors matrices
    mult = {g["block_type"]: g["lr_multiplier"] for g in opt.param_groups}
    assert mult == {k: v for k, v in PAPER.items() if k in mult} and set(mult) >= {"embedding", "qk", "ffn", "vo"}
    assert opt.momentum_format == "int8"


def _mean_curve(curves: dict) -> list[tuple[int, float]]:
    steps = sorted(set.intersection(*[{s for s, _ in c} for c in curves.values()]))
    return [(s, sum(dict(c)[s] for c in curves.values()) / len(curves)) for s in steps]


def test_blr_speedup_table_from_a_tiny_sweep(cli, corpus, cache_dir, tmp_path):  # noqa: F811 - pytest fixtures
    import subprocess
    import sys
    from pathlib import Path

    runs = tmp_path / "runs" / "blr"
    for half, opts, lrs in (("a", "adamw,adamw+blr", "adamw=3e-3,6e-3;adamw+blr=1e-3"),
                            ("b", "adam-mini-default,adam-mini-default+blr", "adam-mini-default=3e-3;adam-mini-default+blr=1e-3")):
        rc, _, err = cli(tiny_args(corpus, cache_dir, runs / f"S300_{half}", "--optimizers", opts, "--seeds", "0,1",
                                   "--lrs", lrs))
        assert rc == 0, err
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "blr_speedup_table.py"
    res = tmp_path / "res"
    done = subprocess.run([sys.executable, str(script), "--write", "--root", str(tmp_path), "--res", str(res)],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    data = json.loads((res / "S300.json").read_text())
    # the AdamW half's own summary has the target; the merged table reaches it across the two sweeps
    summary = json.loads((runs / "S300_a" / "summary.json").read_text())
    assert data["budget"] == 6 and data["target"] == summary["steps_to_adamw_loss"]["target"]
    for opt in ("adamw", "adamw+blr"):
        assert data["optimizers"][opt]["steps_to_adamw_loss"] == summary["steps_to_adamw_loss"]["steps"][opt]
    for o in data["optimizers"].values():
        assert set(o["final"]) == {"0", "1"} and all(c[-1][0] == 6 for c in o["curves"].values())
        first = next((s for s, v in _mean_curve(o["curves"]) if v <= data["target"]), None)
        assert o["steps_to_adamw_loss"] == first
    rows = [ln for ln in done.stdout.splitlines() if ln.startswith("| 6 |")]
    assert [r.split(" | ")[1] for r in rows] == ["AdamW", "AdamW + BLR", "AdamMini default", "AdamMini default + BLR"]
    st = data["optimizers"]["adamw"]["steps_to_adamw_loss"]  # AdamW reaches its own final loss by the end
    assert st is not None and st <= 6 and f"| {st} | {6 / st:.2f}x |" in rows[0]


def test_blr_half_budget_table_merges_one_optimizers_grid_across_sweeps(cli, corpus, cache_dir, tmp_path):  # noqa: F811
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    runs = tmp_path / "runs" / "blr"
    rc, _, err = cli(tiny_args(corpus, cache_dir, runs / "S300_a", "--optimizers", "adamw", "--seeds", "0,1",
                               "--lrs", "adamw=3e-3"))
    assert rc == 0, err
    for half, lr in (("a", "1e-3"), ("b", "1e-2")):  # one optimizer, its two lrs in two sweeps
        rc, _, err = cli(tiny_args(corpus, cache_dir, runs / f"S600_{half}", "--optimizers", "adamw+blr",
                                   "--seeds", "0,1", "--lrs", f"adamw+blr={lr}"))
        assert rc == 0, err
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "blr_speedup_table.py"
    res = tmp_path / "res"
    res.mkdir()
    # the full-budget record: an S300-style record of AdamW alone, filed as S1200 (the same format)
    (runs / "S300_b").mkdir()
    shutil.copy(runs / "S300_a" / "summary.json", runs / "S300_b" / "summary.json")
    shutil.copy(runs / "S300_a" / "metrics.jsonl", runs / "S300_b" / "metrics.jsonl")
    done = subprocess.run([sys.executable, str(script), "--write", "--root", str(tmp_path), "--res", str(res)],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    (res / "S1200.json").write_text((res / "S300.json").read_text())
    done = subprocess.run([sys.executable, str(script), "--write", "--root", str(tmp_path), "--res", str(res)],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    half = json.loads((res / "half_S600.json").read_text())
    o = half["optimizers"]["adamw+blr"]
    assert o["grid"] == [1e-3, 1e-2]  # the union of the two sweeps' grids
    finals = {}
    for h in ("a", "b"):
        for r in json.loads((runs / f"S600_{h}" / "summary.json").read_text())["runs"]:
            finals.setdefault(r["lr"], {})[str(r["seed"])] = r["final_val_loss"]
    best = min(finals, key=lambda lr: sum(finals[lr].values()))
    assert o["best_lr"] == best and o["final"] == finals[best]
    ref = json.loads((res / "S1200.json").read_text())["optimizers"]["adamw"]["final"]
    assert half["adamw_final"] == ref
    row = next(ln for ln in done.stdout.splitlines() if ln.startswith("| AdamW + BLR | 0.001 / 0.01 |"))
    below = sum(v <= ref[k] for k, v in finals[best].items())
    assert row.endswith(f"| {below} of 2 |")
