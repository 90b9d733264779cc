"""Stacked mixture-of-experts weights under FSDP2 (3 ranks, gloo): equal to one process.

Dim 0 of a stacked tensor is the expert, so FSDP2's ``Shard(0)`` gives each rank whole experts and
no block crosses a shard boundary (5 experts at world 3: 2, 2 and 1)."""

from __future__ import annotations

import json

import pytest
import torch
from dist_helpers import _moe, single_process_moe_run, spawn


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("moe")
    spawn("worker_moe", 3, out)
    runs = torch.load(out / "moe3.pt", weights_only=False)
    runs_routes.update(json.loads((out / "moe3-routes.json").read_text()))
    return runs


runs_routes: dict[str, str] = {}


def test_stacked_experts_under_fsdp2_equal_one_process(runs):
    ref = single_process_moe_run()
    assert set(runs) == set(ref)
    for name in ref:
        for key in ("param", "exp_avg", "block_exp_avg_sq"):
            got, want = runs[name][key], ref[name][key]
            assert got.shape == want.shape, (name, key)
            scale = want.abs().max().item() or 1.0
            assert (got - want).abs().max().item() / scale <= 1e-6, (name, key)
    assert runs["experts_t.gate_up_proj"]["block_exp_avg_sq"].numel() == 5 * 8  # per expert and column
    # every tensor took the sharded step (FSDP2 shards dim 0 of all of them), as opt.routes reports
    assert runs_routes == dict.fromkeys(ref, "sharded")
    start = dict(_moe().named_parameters())["experts_t.gate_up_proj"]
    assert (runs["experts_t.gate_up_proj"]["param"] - start).abs().max().item() > 1e-3  # it trained
