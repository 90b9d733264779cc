"""AdamMini(calibrate=N) under FSDP2 at world size 3 (gloo): the same plan and training as one process,
before and after the switch, and DCP checkpoints from either phase resume exactly."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import max_rel_diff
from dist_helpers import single_process_snr_run, spawn


@pytest.fixture(scope="module")
def all_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("snr")
    spawn("worker_snr", 3, out)
    return torch.load(out / "snr3.pt", weights_only=False)


@pytest.fixture(params=["adamw", "budget"], ids=["calibrate_state=adamw", "calibrate_state=budget"])
def mode(request):
    return request.param


@pytest.fixture
def runs(all_runs, mode):
    return all_runs[mode]


def test_fsdp2_world_3_equals_one_process_after_the_switch(runs, mode):
    ref = single_process_snr_run(mode)
    got = runs["run"]
    # the same SNRs (adamw: each tensor's full v is gathered before measuring; budget: the sample is
    # summed over ranks, one rank holding each value; only the gradients' reduction order differs) and
    # so the same plan
    a, b = json.loads(got["calibration"]), json.loads(ref["calibration"])
    assert a["steps"] == b["steps"] == [3, 4] and a["values"].keys() == b["values"].keys()
    for name, by in b["values"].items():
        for label, vals in by.items():
            rel = 1e-9 if mode == "adamw" else 1e-6  # the sample's v is fp32
            assert a["values"][name][label] == pytest.approx(vals, rel=rel, nan_ok=True), (name, label)
    assert got["plan"] == ref["plan"]
    assert '"snr_choice":"column"' in got["plan"].replace(" ", "")
    assert set(got["snapshot"]) == set(ref["snapshot"])
    for name, s in ref["snapshot"].items():
        for key, want in s.items():
            assert max_rel_diff(got["snapshot"][name][key], want) <= 1e-9, (name, key)


@pytest.mark.parametrize("at", [2, 6], ids=["checkpoint while calibrating", "checkpoint after the switch"])
def test_dcp_checkpoint_resumes_exactly(runs, at):
    a, b = runs["run"], runs[f"resumed-{at}"]
    assert a["plan"] == b["plan"]
    for name, s in a["snapshot"].items():
        for key, want in s.items():
            assert torch.equal(b["snapshot"][name][key], want), (name, key)
