"""`blockopt memory`: the live bytes at the worst point of a step, per setup, on llama-micro.

seq 8 keeps the activations of llama-micro (d_model 64) below its gradients, so that AdamW's worst
point is the end of backward, where weights, gradients and state all live (16 bytes per parameter).
"""

from __future__ import annotations

import json
import sys

import pytest
import torch

import blockopt
from blockopt import memory
from blockopt.bench.errors import BenchInputError
from blockopt.cli import main
from blockopt.memory import RECORD_KEYS, measure
from blockopt.memory.tracker import LiveStorages
from blockopt.models import build_model

SIZES = {"batch": 1, "seq": 8, "steps": 2}
MIB_ARGS = ["--model", "llama-micro", "--seq", "8", "--steps", "2"]


def _accepts_weights() -> bool:
    """Whether this blockopt's AdamMini keeps bf16 weights (``weights="bf16-sr"``)."""
    try:
        blockopt.AdamMini(build_model("llama-micro", seed=None), weights="bf16-sr")
    except TypeError:
        return False
    return True


needs_weights = pytest.mark.skipif(not _accepts_weights(), reason="AdamMini(weights=...) is not in this blockopt yet")


def test_the_live_total_follows_storages_made_and_freed_and_sees_gradients_made_in_backward():
    lin = torch.nn.Linear(32, 32)
    live = LiveStorages()
    seen = []
    lin.weight.register_post_accumulate_grad_hook(lambda p: seen.append(live.tracks(p.grad)))
    with live:
        x = torch.empty(1000)
        view = x[10:]
        assert live.total == 4000 and live.tracks(view)
        del x
        assert live.total == 4000  # the view holds the storage
        del view
        assert live.total == 0
        lin(torch.randn(4, 32)).sum().backward()
    assert seen == [True] and live.tracks(lin.weight.grad)


@pytest.fixture(scope="module")
def records():
    """Three setups, measured in this process, each on a copy of the same model (the command line's
    processes are tested below)."""
    out = measure(build_model("llama-micro"), "adamw,adam-mini:step_in_backward=true,adam-mini:momentum=int8",
                  **SIZES)
    return {r["setup"]: r for r in out}


def test_adamw_holds_fp32_weights_grads_and_two_state_tensors_at_its_worst_point(records):
    r = records["adamw"]
    assert "error" not in r, r
    n = r["params"]
    assert n == sum(p.numel() for p in build_model("llama-micro", device="meta", seed=None).parameters())
    assert r["weights"] == pytest.approx(4 * n, rel=0.02)
    assert r["state"] == pytest.approx(8 * n, rel=0.02)  # exp_avg and exp_avg_sq (+ the step counters)
    assert 0.8 * 4 * n <= r["grads"] <= 1.05 * 4 * n  # the embedding's gradient may still be on its way
    assert r["bytes_per_param"] == pytest.approx(16, rel=0.05)
    assert r["bytes_per_param"] == pytest.approx((r["weights"] + r["grads"] + r["state"]) / n, abs=1e-3)
    assert r["activations"] >= 0 and r["other"] >= 0
    assert r["device"] == "cpu" and r["at"].startswith("step ")


def test_step_in_backward_frees_the_gradients_inside_backward(records):
    adamw, sib = records["adamw"], records["adam-mini:step_in_backward=true"]
    assert "error" not in sib, sib
    assert sib["weights"] == adamw["weights"]
    assert sib["grads"] < 0.5 * adamw["grads"]
    assert sib["bytes_per_param"] < 0.6 * adamw["bytes_per_param"]


def test_int8_momentum_keeps_under_a_third_of_adamws_state(records):
    int8 = records["adam-mini:momentum=int8"]
    assert "error" not in int8, int8
    assert int8["state"] < 0.3 * records["adamw"]["state"]
    assert int8["weights"] == records["adamw"]["weights"]


def test_a_module_is_measured_on_a_copy_without_rss():
    model = build_model("llama-micro")
    before = [p.detach().clone() for p in model.parameters()]
    [r] = measure(model, ["adamw"], batch=1, seq=8, steps=1)
    assert "error" not in r, r
    assert r["weights"] == 4 * r["params"] and r["peak_rss"] is None
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))  # a copy was trained


@needs_weights
def test_bf16_weights_halve_the_weights_and_the_remainder_counts_as_weights():
    model = build_model("llama-micro")
    lean, rem = measure(model, ["lean", "adam-mini:weights=bf16+int8"], **SIZES)
    n = lean["params"]
    assert "error" not in lean and "error" not in rem, (lean, rem)
    assert lean["weights"] == pytest.approx(2 * n, rel=0.02)
    assert rem["weights"] == pytest.approx(3 * n, rel=0.02)  # bf16 + the int8 remainder in the state
    assert lean["grads"] < 0.5 * 4 * n
    assert lean["bytes_per_param"] < 5


def test_cli_json_prints_one_record_per_setup_with_every_key(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao", None)  # as if torchao were not installed
    rc = main(["memory", *MIB_ARGS, "--setups", "adamw,adamw8bit-torchao", "--json"])
    out, err = capsys.readouterr()
    lines = [json.loads(x) for x in out.splitlines()]
    assert rc == 1, err  # one setup could not run
    assert [r["setup"] for r in lines] == ["adamw", "adamw8bit-torchao"]
    for r in lines:
        assert set(RECORD_KEYS) <= set(r), r
    ok, missing = lines
    assert "error" not in ok and ok["weights"] == 4 * ok["params"]  # measured in a process of its own
    assert ok["bytes_per_param"] == pytest.approx(16, rel=0.05)
    assert all(isinstance(ok[k], int) for k in ("weights", "grads", "state", "activations", "other", "peak_rss"))
    assert ok["peak_rss"] > 4 * ok["weights"]  # the steps' peak above the idle RSS: at least its tensors
    assert isinstance(ok["peak_rss_build"], int) and ok["peak_rss_build"] >= ok["weights"]  # the build's own
    assert ok["allocator"] == "mmap"  # the default: tensors above 128 KiB mapped on their own
    assert "torchao" in missing["error"] and "pip install" in missing["error"]
    assert all(missing[k] is None for k in ("weights", "grads", "state", "bytes_per_param", "peak_rss"))
    assert "llama-micro: 164,288 parameters" in err


def test_a_missing_optional_package_is_a_record_with_an_error_and_no_process(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    monkeypatch.setattr(memory.subprocess, "run", lambda *a, **k: pytest.fail("a process was started"))
    [r] = measure("llama-micro", "adamw8bit-bnb", **SIZES)
    assert "bitsandbytes" in r["error"] and r["weights"] is None and r["bytes_per_param"] is None


@pytest.mark.parametrize("setups, expected", [
    ("adamw,adam-max", "unknown setup 'adam-max'"),
    ("adamw:momentum=int8", "adamw takes no options"),
    ("adam-mini:momentum=int4", "bad option 'momentum=int4'"),
    ("adam-mini:weight=bf16-sr", "bad option 'weight=bf16-sr'"),
])
def test_a_bad_setup_is_exit_status_2_naming_it_and_runs_nothing(setups, expected, capsys, monkeypatch):
    monkeypatch.setattr(memory.subprocess, "run", lambda *a, **k: pytest.fail("a process was started"))
    rc = main(["memory", *MIB_ARGS, "--setups", setups])
    out, err = capsys.readouterr()
    assert rc == 2 and out == ""
    assert err.startswith("blockopt memory: error: --setups:") and expected in err, err
    assert "allowed" in err and "adam-mini" in err and len(err.strip().splitlines()) == 1


def test_lean_is_an_alias_and_the_llama_300m_preset_is_about_300m_parameters():
    [lean] = memory.parse_setups("lean")
    assert (lean.name, lean.momentum, lean.weights, lean.step_in_backward) == ("adam-mini", "int8", "bf16-sr", True)
    assert 280e6 < memory.describe_model("llama-300m")["params"] < 320e6


def test_an_unknown_allocator_is_refused_before_anything_runs(monkeypatch):
    monkeypatch.setattr(memory.subprocess, "run", lambda *a, **k: pytest.fail("a process was started"))
    with pytest.raises(BenchInputError, match=r"--allocator: 'tcmalloc'; expected one of mmap, heap"):
        memory.measure("llama-micro", "adamw", allocator="tcmalloc")
