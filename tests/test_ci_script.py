"""``.ci/run`` runs README's test command, read from README, in a fresh virtual environment."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _extract(readme: str) -> str:
    """The command .ci/run would run for this README text (its own awk line, run on the text)."""
    script = (ROOT / ".ci" / "run").read_text()
    awk = next(line for line in script.splitlines() if line.startswith("cmd=$(awk "))
    program = awk[len("cmd=$(awk '"):awk.rindex("' README.md)")]
    return subprocess.run(["awk", program], input=readme, capture_output=True, text=True, check=True).stdout.strip()


@pytest.mark.skipif(shutil.which("awk") is None, reason="needs awk, as .ci/run does")
def test_ci_reads_the_test_command_from_readme():
    cmd = _extract((ROOT / "README.md").read_text())
    assert cmd.startswith("pip install torch==2.13.0 && pip install -e \".[test]\""), cmd
    assert "python -m pytest" in cmd and "ruff check" in cmd and "lint-imports" in cmd, cmd
    # the line right after the marker's opening fence, and nothing else
    assert _extract("x\n<!-- test-command -->\n```bash\necho one\necho two\n```\n```bash\necho three\n```\n") == "echo one"
    assert _extract("no marker here\n```bash\necho one\n```\n") == ""


def test_ci_makes_a_fresh_environment_and_refuses_a_readme_without_the_command():
    script = (ROOT / ".ci" / "run").read_text()
    assert "python3 -m venv" in script and 'source "$venv/bin/activate"' in script
    assert 'bash -euo pipefail -c "$cmd"' in script
    assert "README.md has no test command" in script
