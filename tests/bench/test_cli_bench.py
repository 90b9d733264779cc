"""`blockopt bench` end to end in tiny mode: files and fields, fairness, resume, dry run, bad input."""

# fixtures are imported from bench_helpers (see there why), so test arguments shadow the imports
# ruff: noqa: F811

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
from bench_helpers import (  # noqa: F401 - fixtures
    cache_dir,
    cli,
    corpus,
    keep_torch_threads,
    tiny_args,
)

from blockopt.bench import runner
from blockopt.cli import main

RUN_FIELDS = ("optimizer", "lr", "seed", "final_val_loss", "state_bytes", "tokens_per_s", "step_ms",
              "peak_mem_bytes", "diverged")
GRID = "adamw=1e-3,3e-3;adam-mini=2e-3"
GRID_ARGS = ("--optimizers", "adamw,adam-mini", "--lrs", GRID)


@pytest.fixture(scope="module")
def finished(tmp_path_factory, corpus, cache_dir):
    """One finished tiny sweep: AdamW at two learning rates, Adam-mini at one."""
    out = tmp_path_factory.mktemp("sweep") / "out"
    import io
    from contextlib import redirect_stderr, redirect_stdout

    so, se = io.StringIO(), io.StringIO()
    with redirect_stdout(so), redirect_stderr(se):
        rc = main(tiny_args(corpus, cache_dir, out, *GRID_ARGS))
    return {"out": out, "rc": rc, "stdout": so.getvalue(), "stderr": se.getvalue()}


def test_tiny_sweep_writes_every_output(finished):
    out = finished["out"]
    assert finished["rc"] == 0, finished["stderr"]
    for name in ("manifest.json", "summary.json", "metrics.jsonl", "report.md", "loss_vs_steps.png",
                 "loss_vs_time.png", "memory.png", "lr_sweep.png"):
        assert (out / name).is_file(), name
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] is True
    assert [(r["optimizer"], r["lr"]) for r in summary["runs"]] == [("adamw", 1e-3), ("adamw", 3e-3),
                                                                     ("adam-mini", 2e-3)]
    for r in summary["runs"]:
        for f in RUN_FIELDS:
            assert f in r, f
        assert r["status"] == "ok" and r["diverged"] is False and r["steps"] == 6
        assert math.isfinite(r["final_val_loss"]) and r["final_val_loss"] < math.log(256)
        assert r["tokens"] == 6 * 2 * 16 and r["tokens_per_s"] > 0 and r["step_ms"] > 0
        assert r["peak_mem_bytes"] > 0
    env = summary["environment"]
    assert {"torch", "device", "dtype", "threads"} <= set(env) and env["threads"] == 1


def test_state_bytes_are_measured_from_the_state(finished):
    summary = json.loads((finished["out"] / "summary.json").read_text())
    by = {r["optimizer"]: r for r in summary["runs"]}
    adamw, mini = by["adamw"], by["adam-mini"]
    # AdamW: exp_avg + exp_avg_sq per parameter (+ 4-byte step counters)
    assert 2 * adamw["param_bytes"] <= adamw["state_bytes"] <= 2 * adamw["param_bytes"] + 4 * 64
    assert 0.45 < mini["state_bytes"] / adamw["state_bytes"] < 0.55
    # the peak over the run: the state has one size from the first step on for both
    assert adamw["peak_state_bytes"] == adamw["state_bytes"] and mini["peak_state_bytes"] == mini["state_bytes"]
    w = {x["optimizer"]: x for x in summary["winners"]}
    assert w["adam-mini"]["vs_adamw"]["peak_state_bytes"] == mini["peak_state_bytes"] / adamw["peak_state_bytes"]


def test_winner_is_the_lowest_final_held_out_loss(finished):
    summary = json.loads((finished["out"] / "summary.json").read_text())
    adamw_runs = [r for r in summary["runs"] if r["optimizer"] == "adamw"]
    best = min(adamw_runs, key=lambda r: r["final_val_loss"])
    w = {w["optimizer"]: w for w in summary["winners"]}
    assert w["adamw"]["best_lr"] == best["lr"]
    assert w["adamw"]["final_val_loss"] == pytest.approx(best["final_val_loss"])
    assert w["adamw"]["best_lr_at_edge"] is True  # two-point grid: the winner is always at an edge
    ratio = w["adam-mini"]["vs_adamw"]["val_loss"]
    assert ratio == pytest.approx(w["adam-mini"]["final_val_loss"] / best["final_val_loss"])


def test_same_init_and_same_batches_for_every_run(finished):
    """Before any update, every run of a seed sees the same weights on the same batch."""
    lines = [json.loads(ln) for ln in (finished["out"] / "metrics.jsonl").read_text().splitlines()]
    assert {"run", "optimizer", "lr", "seed", "step", "tokens", "time_s"} <= set(lines[0])
    val0 = {ln["run"]: ln["val_loss"] for ln in lines if ln["step"] == 0}
    train1 = {ln["run"]: ln["train_loss"] for ln in lines if ln["step"] == 1}
    assert len(val0) == len(train1) == 3
    assert len(set(val0.values())) == 1, val0
    assert len(set(train1.values())) == 1, train1
    # and the runs differ afterwards
    last = {ln["run"]: ln["val_loss"] for ln in lines if ln["step"] == 6}
    assert len(set(last.values())) == 3
    # the schedule: same warmup for everyone, peak = each run's lr at the end of warmup
    lr_at_warmup = {ln["run"]: ln["lr_now"] for ln in lines if ln["step"] == 1}
    assert lr_at_warmup == {"adamw-lr0.001-s0": 1e-3, "adamw-lr0.003-s0": 3e-3, "adam-mini-lr0.002-s0": 2e-3}


def test_table_and_report(finished):
    stdout = finished["stdout"]
    header = stdout.splitlines()[1]
    assert header.split() == ["AdamW", "Adam-mini"]  # side by side
    assert "held-out loss" in stdout and "optimizer state" in stdout
    assert f"report: {finished['out'] / 'report.md'}" in stdout
    report = (finished["out"] / "report.md").read_text()
    assert "| AdamW | 0.001" in report or "| AdamW | 0.003" in report
    assert "Adam-mini" in report and "## Environment" in report and "torch" in report
    assert "at the edge of its grid" in report
    assert "![loss vs steps](loss_vs_steps.png)" in report


def test_out_folder_with_another_sweep_is_refused(finished, corpus, cache_dir, cli):
    out = finished["out"]
    before = (out / "summary.json").read_bytes()
    rc, stdout, err = cli(tiny_args(corpus, cache_dir, out, *GRID_ARGS, "--steps", "7"))
    assert rc == 2 and stdout == ""
    assert err.count("\n") == 1 and "holds a different sweep" in err and "steps" in err
    assert (out / "summary.json").read_bytes() == before


def test_same_sweep_needs_resume(finished, corpus, cache_dir, cli):
    rc, _, err = cli(tiny_args(corpus, cache_dir, finished["out"], *GRID_ARGS))
    assert rc == 2 and "--resume" in err and "finished" in err


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, corpus, cache_dir, cli):
    out = tmp_path / "never"
    rc, stdout, err = cli(tiny_args(corpus, cache_dir, out, *GRID_ARGS, "--seeds", "0,1", "--dry-run"))
    assert rc == 0, err
    assert not out.exists()
    for run_id in ("adamw-lr0.001-s0", "adamw-lr0.003-s1", "adam-mini-lr0.002-s1"):
        assert run_id in stdout
    assert "estimate 6 runs" in stdout and "parameters" in stdout
    rc, stdout, _ = cli(tiny_args(corpus, cache_dir, out, "--dry-run", "--json"))
    plan = json.loads(stdout)
    # the default comparison: AdamW, Adam-mini (official rules) and Adam-mini with blocks from data
    assert [(r["optimizer"], r["status"]) for r in plan["runs"]] == [
        ("adamw", "to run"), ("adam-mini", "to run"), ("adam-mini-default", "to run")]
    assert plan["estimate"]["tokens_per_run"] == 6 * 2 * 16 and plan["estimate"]["step_s"] > 0
    assert not out.exists()


def test_resume_continues_from_the_checkpoint(tmp_path, corpus, cache_dir, cli, monkeypatch):
    args = ("--checkpoint-every", "3", "--optimizers", "adamw,adam-mini")
    # reference: the same sweep, uninterrupted
    rc, _, err = cli(tiny_args(corpus, cache_dir, tmp_path / "ref", *args))
    assert rc == 0, err
    ref = {r["optimizer"]: r for r in json.loads((tmp_path / "ref" / "summary.json").read_text())["runs"]}

    # interrupt the second run (adam-mini) at update 5, after its checkpoint at step 3 and the line
    # it logged for step 4 (which the resumed run must log again, once)
    out = tmp_path / "out"
    calls = []
    real_lr_at = runner.lr_at

    def lr_at_then_interrupt(step, *a, **k):
        calls.append(step)
        if len(calls) == 6 + 5:  # adamw's 6 updates, then adam-mini's 5th
            raise KeyboardInterrupt
        return real_lr_at(step, *a, **k)

    monkeypatch.setattr(runner, "lr_at", lr_at_then_interrupt)
    rc, _, err = cli(tiny_args(corpus, cache_dir, out, *args))
    assert rc == 130 and "--resume" in err
    assert not (out / "summary.json").exists()  # nothing looks complete
    assert json.loads((out / "manifest.json").read_text())["status"] == "running"
    done = out / "runs" / "adamw-lr0.003-s0" / "result.json"
    assert done.is_file()
    partial = out / "runs" / "adam-mini-lr0.003-s0"
    assert (partial / "checkpoint.pt").is_file()
    assert [json.loads(ln)["step"] for ln in (partial / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2, 3, 4]
    done_bytes = done.read_bytes()

    monkeypatch.setattr(runner, "lr_at", real_lr_at)
    executed = []
    real_execute = runner.execute_run

    def spy(job, emit):
        executed.append(job.run.run_id)
        return real_execute(job, emit)

    monkeypatch.setattr(runner, "execute_run", spy)
    rc, _, err = cli(tiny_args(corpus, cache_dir, out, *args, "--resume"))
    assert rc == 0, err
    assert executed == ["adam-mini-lr0.003-s0"]  # the finished run is not repeated
    assert done.read_bytes() == done_bytes
    runs = {r["optimizer"]: r for r in json.loads((out / "summary.json").read_text())["runs"]}
    assert runs["adam-mini"]["resumed_from_step"] == 3 and runs["adam-mini"]["segments"] == 2
    for opt in ("adamw", "adam-mini"):  # same batches, same state: the same result as without interruption
        assert runs[opt]["final_val_loss"] == pytest.approx(ref[opt]["final_val_loss"], rel=1e-6, abs=1e-6)
    steps = [json.loads(ln)["step"] for ln in (partial / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2, 3, 4, 5, 6]
    assert not (partial / "checkpoint.pt").exists()
    top = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(top) == 2 * 7


def test_every_builtin_optimizer_resumes_exactly(tmp_path, corpus, cache_dir, cli, monkeypatch):
    """Interrupt each run at its first checkpoint, resume until done: the same results as straight through."""
    from blockopt.bench.optimizers import REGISTRY

    names = [n for n, s in REGISTRY.items() if s.extra in (None, "official") and s.missing() is None]
    args = ("--checkpoint-every", "2", "--optimizers", ",".join(names), "--eval-every", "2")
    rc, _, err = cli(tiny_args(corpus, cache_dir, tmp_path / "ref", *args))
    assert rc == 0, err
    ref = {r["optimizer"]: r for r in json.loads((tmp_path / "ref" / "summary.json").read_text())["runs"]}

    real_save, interrupted = runner._atomic_torch_save, set()

    def save_then_interrupt(obj, path):
        real_save(obj, path)
        if path.parent.name not in interrupted:
            interrupted.add(path.parent.name)
            raise KeyboardInterrupt

    monkeypatch.setattr(runner, "_atomic_torch_save", save_then_interrupt)
    out = tmp_path / "out"
    rc, _, _ = cli(tiny_args(corpus, cache_dir, out, *args))
    for _ in range(len(names)):
        if rc != 130:
            break
        rc, _, err = cli(tiny_args(corpus, cache_dir, out, *args, "--resume"))
    assert rc == 0, err
    assert len(interrupted) == len(names)
    runs = {r["optimizer"]: r for r in json.loads((out / "summary.json").read_text())["runs"]}
    for name in names:
        assert runs[name]["resumed_from_step"] == 2, name
        assert runs[name]["final_val_loss"] == pytest.approx(ref[name]["final_val_loss"], rel=1e-6), name


def test_adam_mini_snr_switches_inside_the_run_and_the_report_shows_its_blocks(tmp_path, corpus, cache_dir, cli):
    out = tmp_path / "out"
    rc, _stdout, err = cli(tiny_args(corpus, cache_dir, out, "--optimizers", "adamw,adam-mini-snr:calibrate=3",
                                    "--steps", "8"))
    assert rc == 0, err
    summary = json.loads((out / "summary.json").read_text())
    snr = next(r for r in summary["runs"] if r["optimizer"] == "adam-mini-snr:calibrate=3")
    assert snr["snr_phase"] == "done" and snr["snr_calibrate_steps"] == 3 and snr["steps"] == 8
    by_role = snr["snr_blocks_by_role"]
    assert {"query", "key", "value", "attn_out", "mlp_up", "mlp_down", "embedding", "norm"} <= set(by_role)
    assert sum(sum(v.values()) for v in by_role.values()) == len(json.loads((out / "runs" / snr["run_id"] /
                                                                              "result.json").read_text())
                                                                ["snr_blocks_by_role"]["query"]) * 0 + 38
    report = (out / "report.md").read_text()
    assert "## Blocks chosen from data" in report and "| query |" in report
    assert "first 3 steps" in report
    # memory is the peak: inside the 0.55x budget during the window (the SNR sample included) and after it
    adamw = next(r for r in summary["runs"] if r["optimizer"] == "adamw")
    assert snr["state_bytes"] <= snr["peak_state_bytes"] <= 0.55 * adamw["peak_state_bytes"]
    assert "state (peak)" in report
    # the kernel is loaded before the clock starts and reported apart
    assert all(r["kernel_load_s"] is not None for r in summary["runs"] if r["optimizer"] != "adamw")
    assert "*kernel*" in report


def test_adam_mini_with_builtin_rules_and_a_budget_stays_within_it_at_every_step(tmp_path, corpus, cache_dir, cli):
    out = tmp_path / "out"
    rc, _stdout, err = cli(tiny_args(corpus, cache_dir, out, "--optimizers",
                                    "adamw,adam-mini:rules=builtin:state_budget=0.55"))
    assert rc == 0, err
    summary = json.loads((out / "summary.json").read_text())
    by = {r["optimizer"]: r for r in summary["runs"]}
    mini, adamw = by["adam-mini:rules=builtin:state_budget=0.55"], by["adamw"]
    assert 0.52 < mini["peak_state_bytes"] / adamw["peak_state_bytes"] <= 0.55
    assert mini["peak_state_bytes"] == mini["state_bytes"]


def test_step_in_backward_runs_as_an_option_with_its_own_row(tmp_path, corpus, cache_dir, cli):
    out = tmp_path / "out"
    rc, _stdout, err = cli(tiny_args(corpus, cache_dir, out, "--optimizers",
                                     "adam-mini-default,adam-mini-default:step_in_backward=true"))
    assert rc == 0, err
    by = {r["optimizer"]: r for r in json.loads((out / "summary.json").read_text())["runs"]}
    plain, inb = by["adam-mini-default"], by["adam-mini-default:step_in_backward=true"]
    assert inb["status"] == "ok" and math.isfinite(inb["final_val_loss"])
    assert inb["peak_state_bytes"] == plain["peak_state_bytes"]
    report = (out / "report.md").read_text()
    rows = {line.split("|")[1].strip(): line for line in report.splitlines() if line.startswith("| Adam-mini")}
    assert "| in backward |" in rows["Adam-mini (default) (step_in_backward=true)"]  # its time is in fwd+bwd
    assert "in backward" not in rows["Adam-mini (default)"]
    rc, _, err = cli(tiny_args(corpus, cache_dir, tmp_path / "o2", "--optimizers",
                               "adam-mini-default:step_in_backward=maybe"))
    assert rc == 2 and "step_in_backward='maybe'; expected true or false" in err


def test_divergence_is_recorded_not_raised(tmp_path, corpus, cache_dir, cli):
    out = tmp_path / "out"
    rc, _, err = cli(tiny_args(corpus, cache_dir, out, "--optimizers", "adamw", "--lrs", "1e-3,1e30",
                               "--eval-every", "6"))
    assert rc == 0, err
    summary = json.loads((out / "summary.json").read_text())
    bad = next(r for r in summary["runs"] if r["lr"] == 1e30)
    assert bad["status"] == "diverged" and bad["diverged"] is True and bad["final_val_loss"] is None
    assert 1 <= bad["diverged_step"] < 6  # caught on the training loss, before any evaluation
    lines = [json.loads(ln) for ln in (out / "runs" / "adamw-lr1e+30-s0" / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1] == {**lines[-1], "step": bad["diverged_step"], "train_loss": None, "diverged": True}
    assert summary["winners"][0]["best_lr"] == 1e-3
    assert "Diverged: adamw-lr1e+30-s0" in (out / "report.md").read_text()


def test_failing_run_is_recorded_and_exit_code_is_1(tmp_path, corpus, cache_dir, cli, monkeypatch):
    from blockopt.bench import optimizers

    def broken(*a, **k):
        raise RuntimeError("boom")

    spec = optimizers.REGISTRY["adam-mini"]
    monkeypatch.setitem(optimizers.REGISTRY, "adam-mini", optimizers.OptimizerSpec(
        spec.name, spec.label, broken, spec.default_lr, spec.description, options=spec.options))
    out = tmp_path / "out"
    rc, _, err = cli(tiny_args(corpus, cache_dir, out, "--optimizers", "adamw,adam-mini"))
    assert rc == 1 and "failed" in err and "--resume" in err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] is False
    assert [r["status"] for r in summary["runs"]] == ["ok", "error"]
    assert "boom" in summary["runs"][1]["error"]
    assert json.loads((out / "manifest.json").read_text())["status"] == "incomplete"


def test_hf_config_bench(tmp_path, corpus, cache_dir, cli):
    pytest.importorskip("transformers")
    cfg = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
           "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 32}
    out = tmp_path / "out"
    rc, _, err = cli(tiny_args(corpus, cache_dir, out, "--hf-config", json.dumps(cfg), "--steps", "3"))
    assert rc == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"]["name"] == "hf:llama" and summary["model"]["vocab_size"] == 256
    by = {r["optimizer"]: r for r in summary["runs"]}
    assert by["adam-mini"]["state_bytes"] < 0.6 * by["adamw"]["state_bytes"]


def test_isolated_worker_processes(tmp_path, corpus, cache_dir, cli):
    """The default on CPU: each run in a fresh process, so peak RSS is per run."""
    out = tmp_path / "out"
    args = tiny_args(corpus, cache_dir, out, "--steps", "2", "--eval-every", "2", "--optimizers", "adam-mini")
    args[args.index("--isolate") + 1] = "process"
    rc, _, err = cli(args)
    assert rc == 0, err
    runs = json.loads((out / "summary.json").read_text())["runs"]
    assert [r["peak_mem_kind"] for r in runs] == ["process_peak_rss"]
    assert all(r["peak_mem_bytes"] >= r["baseline_mem_bytes"] > 0 for r in runs)
    assert "ran the run alone" in (out / "report.md").read_text()


def _bad_inputs(tmp: Path, corpus: Path) -> list[tuple[str, list[str], str]]:
    empty = tmp / "empty.txt"
    empty.write_text("")
    (tmp / "empty_dir").mkdir()
    return [
        ("missing data", ["--data", str(tmp / "nope.txt")], "no such file or folder"),
        ("empty data file", ["--data", str(empty)], "is empty"),
        ("empty folder", ["--data", str(tmp / "empty_dir")], "holds no text files"),
        ("glob without match", ["--data", str(tmp / "*.nothing")], "matches no files"),
        ("unknown optimizer", ["--optimizers", "adamw,adamx"], "unknown optimizer 'adamx'; available: adamw"),
        ("bad optimizer option", ["--optimizers", "adam-mini:beta3=1"], "bad option 'beta3=1' for adam-mini"),
        ("unknown model", ["--model", "llama-huge"], "unknown model 'llama-huge'; available: llama-tiny"),
        ("lr not a number", ["--lrs", "1e-3,abc"], "'abc' in the list is not a number"),
        ("lr empty item", ["--lrs", "1e-3,,3e-3"], "'' in the list is not a number"),
        ("lr zero", ["--lrs", "adamw=0;adam-mini=1e-3"], "'0' in 'adamw' is not a positive finite learning rate"),
        ("lr negative", ["--lrs=-1e-3"], "'-1e-3' in the list is not a positive finite learning rate"),
        ("lr for unknown optimizer", ["--lrs", "adamx=1e-3"], "'adamx' is not one of the optimizers"),
        ("lr key without values", ["--lrs", "adamw="], "no learning rates after 'adamw'="),
        ("two bare lr lists", ["--lrs", "1e-3;2e-3"], "two lists without an optimizer name"),
        ("bad seeds", ["--seeds", "0,x"], "--seeds: 'x' is not an integer"),
        ("bad betas", ["--betas", "0.9"], "--betas"),
        ("bad steps", ["--steps", "0"], "--steps: 0; expected a positive integer"),
        ("steps not int", ["--steps", "ten"], "invalid int value: 'ten'"),
        ("context too long", ["--context", "100000"], "--context: 100000"),
        ("bpe vocab too small", ["--tokenizer", "bpe", "--vocab-size", "100"], "--vocab-size: 100"),
        ("hf config missing", ["--hf-config", str(tmp / "none.json")], "no such file"),
        ("model and hf config", ["--model", "llama-tiny", "--hf-config", '{"model_type": "llama"}'], "not both"),
        ("resume nothing", ["--resume"], "holds no sweep to resume"),
        ("calibration window zero", ["--optimizers", "adamw,adam-mini-snr:calibrate=0"],
         "adam-mini-snr:calibrate='0'; expected a positive number"),
        ("calibration window too long", ["--optimizers", "adam-mini-snr:calibrate=6"],
         "calibrate=6 gives a calibration window of 6 steps; expected 1 <= window < --steps (6)"),
        ("calibration window not whole", ["--optimizers", "adam-mini-snr:calibrate=2.5"],
         "expected a fraction in (0, 1) or a whole number of steps"),
        ("snr cutoff not positive", ["--optimizers", "adam-mini-snr:snr_cutoff=-1"],
         "adam-mini-snr:snr_cutoff='-1'; expected a positive number"),
        ("unknown rules", ["--optimizers", "adam-mini:rules=mine"],
         "adam-mini:rules='mine'; expected official or builtin"),
        ("budget at half", ["--optimizers", "adam-mini:state_budget=0.5"],
         "adam-mini:state_budget='0.5'; expected a number in (0.5, 1]"),
    ]


@pytest.mark.parametrize("case", [
    "missing data", "empty data file", "empty folder", "glob without match", "unknown optimizer",
    "bad optimizer option", "unknown model", "lr not a number", "lr empty item", "lr zero", "lr negative",
    "lr for unknown optimizer", "lr key without values", "two bare lr lists", "bad seeds", "bad betas", "bad steps",
    "steps not int", "context too long", "bpe vocab too small", "hf config missing", "model and hf config",
    "resume nothing", "calibration window zero", "calibration window too long", "calibration window not whole",
    "unknown rules", "budget at half",
    "snr cutoff not positive",
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, tmp_path, corpus, cache_dir, cli):
    cases = {name: (args, msg) for name, args, msg in _bad_inputs(tmp_path, corpus)}
    args, msg = cases[case]
    out = tmp_path / "out"
    base = tiny_args(corpus, cache_dir, out)
    if "--data" in args:  # replace the default corpus
        i = base.index("--data")
        del base[i:i + 2]
    rc, stdout, err = cli(base + args)
    assert rc == 2
    assert stdout == ""
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert err.startswith("blockopt bench: error: ")
    assert msg in err, err
    assert not out.exists()


def test_missing_optional_dependency_names_the_extra(tmp_path, corpus, cache_dir, cli, monkeypatch):
    monkeypatch.setitem(sys.modules, "adam_mini", None)  # import adam_mini -> ImportError
    monkeypatch.setitem(sys.modules, "pytorch_optimizer", None)
    out = tmp_path / "out"
    for name, extra, pkg in (("adam-mini-official", "official", "adam-mini"), ("lion", "optimizers",
                                                                               "pytorch-optimizer")):
        rc, _, err = cli(tiny_args(corpus, cache_dir, out, "--optimizers", f"adamw,{name}"))
        assert rc == 2 and err.count("\n") == 1
        assert f"needs the package '{pkg}': pip install 'blockopt[{extra}]'" in err
        assert not out.exists()


def test_non_empty_folder_without_sweep_is_refused(tmp_path, corpus, cache_dir, cli):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    rc, _, err = cli(tiny_args(corpus, cache_dir, out))
    assert rc == 2 and "holds no blockopt sweep" in err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_help_documents_the_lr_grammar(cli):
    rc, stdout, _ = cli(["bench", "--help"])
    assert rc == 0
    assert "adamw=1e-3,3e-3;adam-mini=2e-3,4e-3" in stdout and "adam-mini-official" in stdout


def test_help_describes_the_default_run_truthfully(cli):
    """`blockopt bench --help` once said "AdamW vs Adam-mini, ~2-3 min" while the default ran three
    optimizers: the example names what the default compares, from the same constant as the default."""
    from blockopt.bench.optimizers import REGISTRY
    from blockopt.cli import DEFAULT_OPTIMIZERS, _parser

    rc, stdout, _ = cli(["bench", "--help"])
    assert rc == 0
    examples = " ".join(stdout[stdout.index("examples:"):].split())
    default = DEFAULT_OPTIMIZERS.split(",")
    assert default == ["adamw", "adam-mini", "adam-mini-default"]
    assert "blockopt bench # adamw, adam-mini and adam-mini-default: llama-tiny" in examples
    assert f"({len(default)} runs;" in examples
    lrs = {REGISTRY[n].default_lr for n in default}
    want = f"lr {next(iter(lrs)):g}" if len(lrs) == 1 else "each one's default lr"
    assert f"300 steps, {want}, seed 0" in examples
    assert "2-3 min" not in stdout and "AdamW vs Adam-mini," not in stdout
    args = _parser().parse_args(["bench"])
    assert args.optimizers == DEFAULT_OPTIMIZERS and args.steps == 300 and args.seeds == "0" and args.lrs is None


def test_plan_command(cli):
    from blockopt import PartitionPlan

    rc, stdout, err = cli(["plan", "--model", "llama-tiny"])
    assert rc == 0, err
    assert stdout.startswith("llama-tiny: 820,352 parameters") and "head x2" in stdout
    rc, stdout, _ = cli(["plan", "--model", "gpt2-tiny", "--vocab-size", "512", "--json"])
    plan = PartitionPlan.from_json(stdout)
    assert plan["embed.weight"].shape == (512, 128)
    rc, _, err = cli(["plan", "--model", "nope"])
    assert rc == 2 and err.count("\n") == 1 and "unknown model 'nope'" in err
    rc, _, err = cli(["plan"])
    assert rc == 2 and "one of the arguments --model --hf-config is required" in err


def test_plan_hf_config_builds_on_meta_without_download(tmp_path, cli):
    pytest.importorskip("transformers")
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": 1000}))
    rc, stdout, err = cli(["plan", "--hf-config", str(tmp_path)])
    assert rc == 0, err
    assert "c_attn" in stdout and "fused" in stdout
    rc, _, err = cli(["plan", "--hf-config", "gpt2"])  # a hub name: refused, never fetched
    assert rc == 2 and "nothing is downloaded" in err

