"""Benchmark scripts that are cheap enough to run whole in a test: they must keep working against the
library's public API (construction_cost.py once called a private method that a reshaping removed)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_construction_cost_builds_the_default_plan_of_a_7b_config_on_meta():
    pytest.importorskip("transformers")
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "construction_cost.py")], capture_output=True,
                         text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Llama 7B config: 6.74B parameters" in out.stdout and "total" in out.stdout


def test_default_quality_table_reads_the_kept_summaries():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "default_quality_table.py")], capture_output=True,
                         text=True, timeout=120, check=False, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "| AdamW | 0.003 | 1.7526 / 1.7287 / 1.7535 | 1.7449 |" in out.stdout  # the kept llama-tiny runs
    assert "0.549x" in out.stdout


def test_factored_micro_runs_in_a_tiny_mode():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "factored_micro.py"), "64", "96", "--matrices",
                          "2", "--rounds", "2", "--kinds", "row,factored"], capture_output=True, text=True,
                         timeout=300, check=False, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "factored " in out.stdout and "(1.00x)" in out.stdout and "UserWarning" not in out.stderr


def test_memory_table_formats_records(tmp_path):
    rec = ('{"setup": "adamw", "bytes_per_param": 16.0, "weights": 4194304, "grads": 4194304, "state": 8388608, '
           '"activations": 0, "other": 0, "peak_rss": 20971520, "params": 1048576, "device": "cpu"}\n'
           '{"setup": "x", "error": "x failed on cpu: boom", "bytes_per_param": null, "peak_rss": null}\n')
    (tmp_path / "m.json").write_text(rec)
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "memory_table.py"), str(tmp_path / "m.json")],
                         capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "| adamw | 4 MiB | 4 MiB | 8 MiB | 16.00 | 20 MiB | 1.00x |" in out.stdout
    assert "| x | not run: x failed on cpu: boom |" in out.stdout


def test_step_parts_times_each_group_of_the_default_plan_in_a_tiny_mode():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "step_parts.py"), "--model", "gpt2-tiny",
                          "--rounds", "2"], capture_output=True, text=True, timeout=300, check=False, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = {line.split()[0]: line for line in out.stdout.splitlines()[2:]}
    assert {"narrow", "element", "all"} <= set(rows), out.stdout  # gpt2-tiny: factored matrices, per-element v
    assert all(line.rstrip().endswith("fused_cpu") for line in rows.values()), out.stdout  # the C++ kernel ran
    assert "UserWarning" not in out.stderr


@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None, reason="no C++ compiler")
def test_stream_floor_times_its_loops_against_fused_adamw_in_a_tiny_mode():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "stream_floor.py"), "--elements", "100000",
                          "--rounds", "2"], capture_output=True, text=True, timeout=300, check=False, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    loops = [line.split()[0] for line in out.stdout.splitlines()[3:]]
    assert loops == ["4r3w", "3r2w", "3r2w-halves"], out.stdout


@pytest.mark.parametrize("script, arg", [("step_time.py", "--rounds"), ("step_time.py", "--steps"),
                                         ("step_parts.py", "--rounds"), ("stream_floor.py", "--rounds"),
                                         ("stream_floor.py", "--elements"), ("factored_micro.py", "--rounds"),
                                         ("factored_micro.py", "--matrices")])
def test_timing_scripts_refuse_a_zero_count_naming_the_argument(script, arg):
    extra = ["64", "96"] if script == "factored_micro.py" else []
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *extra, arg, "0"],
                         capture_output=True, text=True, timeout=120, check=False, cwd=ROOT)
    assert out.returncode == 2, out.stderr[-2000:]
    assert f"argument {arg}: must be an integer of at least 1, got 0" in out.stderr
    assert "Traceback" not in out.stderr
