"""Pieces of the runner: the LR grid grammar, seeds, schedule, aggregation, state-byte counting."""

from __future__ import annotations

import itertools
import math
import types

import pytest
import torch
from bench_helpers import keep_torch_threads  # noqa: F401 - fixture

from blockopt.bench.errors import BenchInputError
from blockopt.bench.metrics import aggregate, optimizer_state_bytes
from blockopt.bench.optimizers import parse_optimizer
from blockopt.bench.runner import lr_at, parse_lrs, parse_seeds

CHOICES = [parse_optimizer(n) for n in ("adamw", "adam-mini", "adam-mini:value_single_block=true", "adafactor")]


@pytest.mark.parametrize("text, expected", [
    (None, {"adamw": [3e-3], "adam-mini": [3e-3], "adam-mini:value_single_block=true": [3e-3],
            "adafactor": [1e-2]}),
    ("1e-3,3e-3", {k: [1e-3, 3e-3] for k in ("adamw", "adam-mini", "adam-mini:value_single_block=true",
                                             "adafactor")}),
    ("adamw=1e-3;adafactor=1e-2,3e-2", {"adamw": [1e-3], "adam-mini": [3e-3],
                                         "adam-mini:value_single_block=true": [3e-3], "adafactor": [1e-2, 3e-2]}),
    # a bare name covers its variants; a full key wins over it; a bare list covers the rest
    ("2e-3; adam-mini=4e-3 ; adam-mini:value_single_block=true=5e-3;",
     {"adamw": [2e-3], "adam-mini": [4e-3], "adam-mini:value_single_block=true": [5e-3], "adafactor": [2e-3]}),
    ("1e-3,1e-3,2e-3", {k: [1e-3, 2e-3] for k in ("adamw", "adam-mini", "adam-mini:value_single_block=true",
                                                  "adafactor")}),
])
def test_lr_grid_grammar(text, expected):
    assert parse_lrs(text, CHOICES) == expected


@pytest.mark.parametrize("text, msg", [
    ("", "empty"),
    (";", "empty"),
    ("1e-3,x", "'x' in the list is not a number"),
    ("nan", "not a positive finite"),
    ("inf", "not a positive finite"),
    ("muon=1e-3", "'muon' is not one of the optimizers being compared"),
    ("adamw=1e-3;adamw=2e-3", "'adamw' is given twice"),
    ("adamw=", "no learning rates after 'adamw'="),
    ("1e-3;2e-3", "two lists without an optimizer name"),
])
def test_lr_grid_errors(text, msg):
    with pytest.raises(BenchInputError, match=msg):
        parse_lrs(text, CHOICES)


def test_seeds():
    assert parse_seeds("0, 1,2") == (0, 1, 2)
    for bad, msg in (("a", "not an integer"), ("-1", "negative"), ("1,1", "twice"), ("", "not an integer")):
        with pytest.raises(BenchInputError, match=msg):
            parse_seeds(bad)


def test_schedule_warmup_then_cosine_to_the_floor():
    lrs = [lr_at(s, 1.0, steps=100, warmup=10, min_ratio=0.1) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(lrs[9:]))
    assert lrs[-1] == pytest.approx(0.1)
    assert lr_at(0, 1.0, steps=10, warmup=0, min_ratio=0.0) < 1.0  # no warmup: decay from the first step


def _run(opt, lr, seed, loss, status="ok", **kw):
    return {"optimizer": opt, "label": opt, "lr": lr, "seed": seed, "final_val_loss": loss, "status": status,
            "state_bytes": kw.get("state", 100), "step_ms": kw.get("ms", 1.0), "tokens_per_s": 10.0,
            "peak_mem_bytes": 1000, "fwd_bwd_ms": 1.0, "train_time_s": 1.0, "param_bytes": 50}


def test_aggregate_picks_the_best_mean_and_a_diverged_seed_cannot_win():
    runs = [
        _run("adamw", 1e-3, 0, 2.0), _run("adamw", 1e-3, 1, 2.2),  # mean 2.1
        _run("adamw", 3e-3, 0, 1.9), _run("adamw", 3e-3, 1, 2.1),  # mean 2.0: best
        _run("adamw", 1e-2, 0, 1.5), _run("adamw", 1e-2, 1, None, status="diverged"),  # has a diverged seed
        _run("adam-mini", 3e-3, 0, 2.1, state=50, ms=0.5), _run("adam-mini", 3e-3, 1, 1.9, state=50, ms=0.5),
    ]
    agg = aggregate(runs, ["adamw", "adam-mini"], {"adamw": [1e-3, 3e-3, 1e-2], "adam-mini": [3e-3]})
    w = {x["optimizer"]: x for x in agg["winners"]}
    assert w["adamw"]["best_lr"] == 3e-3 and w["adamw"]["final_val_loss"] == pytest.approx(2.0)
    assert w["adamw"]["final_val_loss_std"] == pytest.approx(math.sqrt(0.02))
    assert w["adamw"]["best_lr_at_edge"] is False
    assert agg["lr_sweeps"]["adamw"][2]["failed"] == 1 and agg["lr_sweeps"]["adamw"][2]["final_val_loss_mean"] is None
    r = w["adam-mini"]["vs_adamw"]
    assert r["val_loss"] == pytest.approx(1.0) and r["state_bytes"] == 0.5 and r["step_ms"] == 0.5


def test_aggregate_all_failed():
    agg = aggregate([_run("adamw", 1e-3, 0, None, status="error")], ["adamw"], {"adamw": [1e-3]})
    w = agg["winners"][0]
    assert w["all_failed"] and w["best_lr"] is None and w["vs_adamw"] == {}


def test_state_bytes_count_each_storage_once():
    base = torch.zeros(10, 4)
    fake = types.SimpleNamespace(state={0: {"m": base, "m_view": base.view(40), "v": torch.zeros(3), "step": 5},
                                        1: {"shared": base}})
    assert optimizer_state_bytes(fake) == 40 * 4 + 3 * 4
