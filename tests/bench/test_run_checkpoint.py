"""Run checkpoints: written so that ``torch.load(weights_only=True)`` reads them, resumed to the same
result as a run straight through; the earlier format still resumes; a pickle with code is refused."""

# fixtures are imported from bench_helpers (see there why), so test arguments shadow the imports
# ruff: noqa: F811

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from bench_helpers import cache_dir, cli, corpus, keep_torch_threads, tiny_args  # noqa: F401 - fixtures

from blockopt.bench import runner
from blockopt.bench.checkpoints import CHECKPOINT_FORMAT, CheckpointError, load_checkpoint
from blockopt.bench.run_state import RunState

ARGS = ("--checkpoint-every", "2", "--optimizers", "adamw,adam-mini,muon", "--eval-every", "2")
RUN_IDS = ("adamw-lr0.003-s0", "adam-mini-lr0.003-s0", "muon-lr0.003-s0")


def _interrupted_sweep(tmp_path: Path, corpus: Path, cache_dir: Path, cli, monkeypatch) -> tuple[Path, dict]:
    """A sweep whose every run stopped right after its first checkpoint (step 2); copies of the checkpoints."""
    real_save, kept = runner._atomic_torch_save, {}

    def save_then_interrupt(obj, path):
        real_save(obj, path)
        if path.parent.name not in kept:
            kept[path.parent.name] = tmp_path / f"{path.parent.name}.pt"
            shutil.copy(path, kept[path.parent.name])
            raise KeyboardInterrupt

    monkeypatch.setattr(runner, "_atomic_torch_save", save_then_interrupt)
    out = tmp_path / "out"
    rc, _, _ = cli(tiny_args(corpus, cache_dir, out, *ARGS))
    while rc == 130 and len(kept) < len(RUN_IDS):
        rc, _, _ = cli(tiny_args(corpus, cache_dir, out, *ARGS, "--resume"))
    assert rc == 130 and set(kept) == set(RUN_IDS)
    monkeypatch.setattr(runner, "_atomic_torch_save", real_save)
    for run_id, path in kept.items():  # every run as if stopped at its step-2 checkpoint
        (out / "runs" / run_id / "result.json").unlink(missing_ok=True)
        shutil.copy(path, out / "runs" / run_id / "checkpoint.pt")
    return out, kept


def _runs(out: Path) -> dict[str, dict]:
    return {r["run_id"]: r for r in json.loads((out / "summary.json").read_text())["runs"]}


def _losses(out: Path, run_id: str) -> list[tuple]:
    lines = [json.loads(ln) for ln in (out / "runs" / run_id / "metrics.jsonl").read_text().splitlines()]
    return [(d["step"], d.get("train_loss"), d.get("val_loss"), d.get("grad_norm")) for d in lines]


def _assert_same_log(got: list[tuple], want: list[tuple]) -> None:
    """Every logged record equal: the same steps, the same fields present, each value within 1e-6."""
    assert len(got) == len(want) and len(want) > 0
    for g, w in zip(got, want):
        assert [v is None for v in g] == [v is None for v in w], (g, w)
        assert [v for v in g if v is not None] == pytest.approx([v for v in w if v is not None], rel=1e-6, abs=1e-6)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, corpus, cache_dir):
    """The same sweep, uninterrupted."""
    from blockopt.cli import main

    out = tmp_path_factory.mktemp("ref") / "out"
    assert main(tiny_args(corpus, cache_dir, out, *ARGS)) == 0
    return out


def test_checkpoint_loads_weights_only_and_resume_equals_straight_through(tmp_path, corpus, cache_dir, cli,
                                                                          monkeypatch, reference):
    out, kept = _interrupted_sweep(tmp_path, corpus, cache_dir, cli, monkeypatch)
    for run_id, path in kept.items():
        ck = torch.load(path, weights_only=True)  # no pickled code: plain containers and tensors only
        assert ck["format"] == CHECKPOINT_FORMAT and set(ck) == {"format", "model", "optimizer", "run_state", "rng"}
        assert isinstance(ck["run_state"], str) and RunState.from_json(ck["run_state"]).step == 2, run_id
        assert ck["rng"]["cpu"].dtype == torch.uint8
    rc, _, err = cli(tiny_args(corpus, cache_dir, out, *ARGS, "--resume"))
    assert rc == 0, err
    runs, ref = _runs(out), _runs(reference)
    for run_id in RUN_IDS:
        assert runs[run_id]["resumed_from_step"] == 2 and runs[run_id]["segments"] == 2
        assert runs[run_id]["final_val_loss"] == pytest.approx(ref[run_id]["final_val_loss"], rel=1e-6, abs=1e-6)
        _assert_same_log(_losses(out, run_id), _losses(reference, run_id))
        assert not (out / "runs" / run_id / "checkpoint.pt").exists()


def test_checkpoint_of_the_earlier_format_still_resumes(tmp_path, corpus, cache_dir, cli, monkeypatch, reference):
    """Format 1 (no "format"; the run state as a dict under "state") loads with weights_only=True too."""
    out, kept = _interrupted_sweep(tmp_path, corpus, cache_dir, cli, monkeypatch)
    for run_id, path in kept.items():
        ck = torch.load(path, weights_only=True)
        old = {"model": ck["model"], "optimizer": ck["optimizer"], "state": json.loads(ck["run_state"]),
               "rng": ck["rng"]}
        torch.save(old, out / "runs" / run_id / "checkpoint.pt")
        assert load_checkpoint(out / "runs" / run_id / "checkpoint.pt", "cpu").format == 1
    rc, _, err = cli(tiny_args(corpus, cache_dir, out, *ARGS, "--resume"))
    assert rc == 0, err
    runs, ref = _runs(out), _runs(reference)
    for run_id in RUN_IDS:
        assert runs[run_id]["resumed_from_step"] == 2
        assert runs[run_id]["final_val_loss"] == pytest.approx(ref[run_id]["final_val_loss"], rel=1e-6, abs=1e-6)


class _Payload:
    """Unpickling this would create ``marker``: what a hostile checkpoint could do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_checkpoint_with_pickled_code_is_refused_and_not_run(tmp_path, corpus, cache_dir, cli, monkeypatch):
    out, kept = _interrupted_sweep(tmp_path, corpus, cache_dir, cli, monkeypatch)
    marker = tmp_path / "pwned"
    run_id = RUN_IDS[1]
    ck_path = out / "runs" / run_id / "checkpoint.pt"
    ck = torch.load(kept[run_id], weights_only=True)
    torch.save({**ck, "extra": _Payload(marker)}, ck_path)

    with pytest.raises(CheckpointError, match="weights_only") as e:
        load_checkpoint(ck_path, "cpu")
    assert str(ck_path) in str(e.value) and "delete it" in str(e.value)
    assert not marker.exists()

    rc, _, _err = cli(tiny_args(corpus, cache_dir, out, *ARGS, "--resume"))
    assert rc == 1 and not marker.exists()
    runs = _runs(out)
    assert runs[run_id]["status"] == "error" and str(ck_path) in runs[run_id]["error"]
    assert ck_path.is_file()  # kept for the user to look at or delete
    assert all(runs[r]["status"] == "ok" for r in RUN_IDS if r != run_id)


def test_damaged_checkpoint_is_refused_with_its_name(tmp_path):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="checkpoint.pt"):
        load_checkpoint(path, "cpu")
    torch.save({"model": {}, "optimizer": {}, "format": 99, "run_state": "{}"}, path)
    with pytest.raises(CheckpointError, match="format 99"):
        load_checkpoint(path, "cpu")
    torch.save({"model": {}, "optimizer": {}, "format": CHECKPOINT_FORMAT, "run_state": '{"step": "x"}'}, path)
    with pytest.raises(CheckpointError, match="bad run state"):
        load_checkpoint(path, "cpu")
