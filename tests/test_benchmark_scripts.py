"""Benchmark scripts that are cheap enough to run whole in a test: they must keep working against the
library's public API (construction_cost.py once called a private method that a reshaping removed)."""

from __future__ import annotations

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
