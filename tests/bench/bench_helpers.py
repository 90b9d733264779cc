"""Helpers and fixtures shared by the bench tests.

Test modules import the fixtures by name (``from bench_helpers import cli, ...``): a
``conftest.py`` here would shadow ``tests/conftest.py``, which other tests import as
``conftest`` (pytest puts each test folder on ``sys.path``).
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from blockopt.cli import main

WORDS = [
    "the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "seven", "small", "cats",
    "sit", "on", "warm", "mats", "and", "count", "their", "grey", "feathers", "under", "old", "red", "trees",
]


def write_corpus(path: Path, lines: int = 1500, seed: int = 0) -> Path:
    rng = random.Random(seed)
    path.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 14))) for _ in range(lines))
                    + "\n")
    return path


def tiny_args(corpus: Path, cache_dir: Path, out: Path, *extra: str) -> list[str]:
    """A bench that takes about a second: 6 steps of 2 x 16 tokens, in-process, no live display."""
    return ["bench", "--data", str(corpus), "--cache-dir", str(cache_dir), "--out", str(out),
            "--steps", "6", "--batch-size", "2", "--context", "16", "--eval-every", "3", "--eval-batches", "2",
            "--threads", "1", "--isolate", "none", "--progress", "none", *extra]


@pytest.fixture(autouse=True)
def keep_torch_threads():
    """The bench sets torch's thread count; give the rest of the session its own back."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("data") / "corpus.txt")


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def cli(capsys):
    """``cli(args) -> (exit code, stdout, stderr)``."""

    def run(args: list[str]) -> tuple[int, str, str]:
        capsys.readouterr()
        rc = main([str(a) for a in args])
        out, err = capsys.readouterr()
        return rc, out, err

    return run
