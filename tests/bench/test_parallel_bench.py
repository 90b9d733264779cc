"""`blockopt bench --parallel fsdp|ddp|tp|fsdp+tp` under a real ``torchrun`` (2 ranks, gloo on CPU), and its
input checks."""

# fixtures are imported from bench_helpers (see there why), so test arguments shadow the imports
# ruff: noqa: F811

from __future__ import annotations

import json
import math
import os
import re
import socket
import subprocess
import sys

import pytest
from bench_helpers import (  # noqa: F401 - fixtures
    cache_dir,
    cli,
    corpus,
    keep_torch_threads,
    tiny_args,
)

from blockopt.bench.errors import BenchInputError
from blockopt.bench.runner import SweepConfig, prepare_sweep

OPTIMIZERS = "adamw,adam-mini,adamw+blr,adam-mini+blr,adam-mini-snr:calibrate=3"
RUN_FIELDS = ("optimizer", "lr", "seed", "final_val_loss", "state_bytes", "param_bytes", "tokens_per_s", "step_ms",
              "peak_mem_bytes", "diverged", "steps", "tokens")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(args: list[str], nproc: int = 2) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(nproc),
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "--no-python", "blockopt",
           *[str(a) for a in args]]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180, check=False)


def _one_process(tmp_path_factory, corpus, cache_dir, optimizers: str) -> dict:
    """The same tiny sweep in one process: its summary."""
    import io
    from contextlib import redirect_stderr, redirect_stdout

    from blockopt.cli import main

    out = tmp_path_factory.mktemp("ref") / "out"
    with redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()) as se:
        rc = main(tiny_args(corpus, cache_dir, out, "--optimizers", optimizers, "--no-plots"))
    assert rc == 0, se.getvalue()
    return json.loads((out / "summary.json").read_text())


@pytest.fixture(scope="module")
def reference(tmp_path_factory, corpus, cache_dir):
    return _one_process(tmp_path_factory, corpus, cache_dir, OPTIMIZERS)


@pytest.mark.parametrize("parallel", ["fsdp", "ddp"])
def test_parallel_bench_under_torchrun_equals_one_process(parallel, tmp_path, corpus, cache_dir, reference):
    out = tmp_path / "out"
    proc = _torchrun([*tiny_args(corpus, cache_dir, out, "--optimizers", OPTIMIZERS, "--no-plots"),
                      "--parallel", parallel, "--batch-size", "2"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    for name in ("manifest.json", "summary.json", "metrics.jsonl", "report.md"):
        assert (out / name).is_file(), name
    assert not list(out.glob("runs/*/checkpoint.pt"))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] is True
    env = summary["environment"]
    assert env["parallel"] == parallel and env["world_size"] == 2
    assert summary["protocol"]["batch_size"] == 2 and summary["tokens_per_run"] == 6 * 2 * 16
    ref = {r["optimizer"]: r for r in reference["runs"]}
    assert [r["optimizer"] for r in summary["runs"]] == ["adamw", "adam-mini", "adamw+blr", "adam-mini+blr",
                                                         "adam-mini-snr:calibrate=3"]
    for r in summary["runs"]:
        for f in RUN_FIELDS:
            assert f in r, f
        assert r["status"] == "ok" and r["diverged"] is False and r["steps"] == 6
        assert r["tokens"] == 6 * 2 * 16 and r["parallel"] == parallel and r["world_size"] == 2
        assert r["state_bytes_scope"] == "per_rank"
        one = ref[r["optimizer"]]
        assert r["params"] == one["params"] and r["param_bytes"] == one["param_bytes"]
        # float32: each rank's half-batch loss and the gradient all-reduce sum in another order than one
        # process does; after 6 steps that moves the held-out loss by ~1e-7 relative (measured ~6e-8)
        assert math.isfinite(r["final_val_loss"])
        assert r["final_val_loss"] == pytest.approx(one["final_val_loss"], rel=1e-4), r["optimizer"]
        # optimizer state is counted per rank: FSDP2 shards it over the 2 ranks, DDP keeps it whole
        share = r["state_bytes"] / one["state_bytes"]
        assert share == pytest.approx(0.5 if parallel == "fsdp" else 1.0, rel=0.02), share
    lines = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert {ln["run"] for ln in lines} == {r["run_id"] for r in summary["runs"]}  # rank 0 alone wrote them
    assert [r["run_id"] for r in summary["runs"]] == [r["run_id"] for r in reference["runs"]]


TP_OPTIMIZERS = "adamw,adam-mini,adamw+blr,adam-mini+blr"


@pytest.fixture(scope="module")
def tp_reference(tmp_path_factory, corpus, cache_dir):
    return _one_process(tmp_path_factory, corpus, cache_dir, TP_OPTIMIZERS)


@pytest.mark.parametrize("parallel", ["tp", "fsdp+tp"])
def test_tensor_parallel_bench_under_torchrun_equals_one_process(parallel, tmp_path, corpus, cache_dir, tp_reference):
    """Tensor parallel over 2 ranks (each sees the whole batch), and FSDP2 + TP on a 1x2 mesh (the 2-D
    layout with one data-parallel rank): the same losses as one process, within float32 rounding."""
    out = tmp_path / "out"
    proc = _torchrun([*tiny_args(corpus, cache_dir, out, "--optimizers", TP_OPTIMIZERS, "--no-plots"),
                      "--parallel", parallel])
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] is True and summary["environment"]["parallel"] == parallel
    ref = {r["optimizer"]: r for r in tp_reference["runs"]}
    for r in summary["runs"]:
        assert r["status"] == "ok" and r["steps"] == 6 and r["world_size"] == 2
        one = ref[r["optimizer"]]
        assert r["params"] == one["params"]
        assert r["final_val_loss"] == pytest.approx(one["final_val_loss"], rel=1e-4), r["optimizer"]
        # the blocks' linear layers are split over the 2 ranks; embeddings and norms stay whole
        share = r["state_bytes"] / one["state_bytes"]
        assert 0.5 < share < 1.0, share


def test_tensor_parallel_refuses_the_in_run_calibration(monkeypatch, tmp_path, corpus):
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = SweepConfig(data=str(corpus), out=str(tmp_path / "out"), steps=6, batch_size=2, context=16, plots=False,
                      parallel="tp", optimizers=("adam-mini", "adam-mini-snr"))
    with pytest.raises(BenchInputError, match=r"--optimizers: adam-mini-snr cannot run with --parallel tp; "
                                              r"tensor-parallel runs support adamw, adam-mini, adamw\+blr, adam-mini\+blr"):
        prepare_sweep(cfg)


def test_parallel_unsupported_optimizer_is_one_line_exit_2(tmp_path, corpus, cache_dir):
    out = tmp_path / "out"
    proc = _torchrun([*tiny_args(corpus, cache_dir, out, "--optimizers", "adamw,muon", "--no-plots"),
                      "--parallel", "fsdp"])
    assert proc.returncode != 0
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("blockopt bench: error:")]
    expected = ("blockopt bench: error: --optimizers: muon cannot run with --parallel fsdp; "
                "data-parallel runs support adamw, adam-mini, adamw+blr, adam-mini+blr, adam-mini-snr, adam-mini-snr+blr (without step_in_backward)")
    assert errors == [expected], proc.stderr[-3000:]  # one line: rank 0 alone reports it
    assert not out.exists()


def test_parallel_outside_torchrun_is_a_clear_error(cli, tmp_path, corpus, cache_dir, monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    out = tmp_path / "out"
    rc, stdout, err = cli(tiny_args(corpus, cache_dir, out, "--parallel", "ddp"))
    assert rc == 2 and stdout == ""
    assert err.startswith("blockopt bench: error: --parallel ddp: data-parallel runs need torchrun's environment")
    assert "torchrun --nproc-per-node N" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


@pytest.mark.parametrize("change, message", [
    ({"batch_size": 3}, "--batch-size: 3 does not divide by the data-parallel size 2"),
    ({"optimizers": ("adam-mini", "adafactor")}, "--optimizers: adafactor cannot run with --parallel fsdp"),
    ({"resume": True}, "--resume: not supported with --parallel fsdp"),
    ({"checkpoint_every": 2}, "--checkpoint-every: 2; not supported with --parallel fsdp"),
    ({"isolate": "process"}, "--isolate process: not possible with --parallel fsdp"),
    ({"parallel": "zero"}, "--parallel: 'zero'; allowed: none, fsdp, ddp, tp, fsdp+tp"),
])
def test_parallel_input_checks(change, message, tmp_path, corpus, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = SweepConfig(**{"data": str(corpus), "out": str(tmp_path / "out"), "steps": 6, "batch_size": 2,
                         "context": 16, "plots": False, "parallel": "fsdp", **change})
    with pytest.raises(BenchInputError, match=re.escape(message)):
        prepare_sweep(cfg)


def test_parallel_sweep_has_no_checkpoints_and_runs_in_process(tmp_path, corpus, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    sweep = prepare_sweep(SweepConfig(data=str(corpus), out=str(tmp_path / "out"), steps=10, batch_size=4,
                                      context=16, plots=False, parallel="ddp"))
    assert sweep.checkpoint_every == 0 and sweep.isolate is False and sweep.world_size == 2
    assert sweep.identity["parallel"] == {"mode": "ddp", "world_size": 2}
    one = prepare_sweep(SweepConfig(data=str(corpus), out=str(tmp_path / "out"), steps=10, batch_size=4,
                                    context=16, plots=False))
    assert "parallel" not in one.identity  # one-process sweeps keep their id
