"""FSDP2 at world sizes 2, 3, 4 and DDP at 2 against one process (gloo, CPU, spawned processes).

One module-scoped fixture runs the worker processes once (see ``dist_helpers``):

* world 2: FSDP2 for 10 steps (collectives of every ``step()`` counted, a DCP
  checkpoint after step 5), FSDP2 with 3 layers in two parameter groups
  (collectives counted), DDP, and FSDP2 with ``CPUOffloadPolicy``;
* world 3: FSDP2 for 10 steps; a fresh model and optimizer loaded from the
  world-2 checkpoint and trained 5 more steps; loading it under other plans;
  the same from a single-process ``torch.save`` checkpoint;
* world 4: FSDP2 for 10 steps.

The model: 6 query heads of 4 rows (24 rows, so heads straddle shard
boundaries at 4 ranks and at 3), one KV head (an empty shard at 3 ranks), an
odd vocabulary of 67 rows, a column-blocked and a per-element weight.
"""

from __future__ import annotations

import pytest
import torch
from conftest import max_rel_diff
from dist_helpers import STEPS, save_single_process_checkpoint, single_process_run, spawn, tiny_model

TOL = 1e-6  # relative, float64 models: one process and N processes agree to ~1e-14 here
TOL_FP32 = 1e-5  # float32: the order of the gradient reduction alone moves per-element Adam by ~1e-6


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    spawn("worker_world2", 2, out)
    save_single_process_checkpoint(out / "plain.pt")
    spawn("worker_fsdp", 3, out, str(out / "ckpt"), str(out / "plain.pt"))
    spawn("worker_fsdp", 4, out)
    return {w: torch.load(out / f"world{w}.pt", weights_only=False) for w in (2, 3, 4)}


@pytest.fixture(scope="module")
def reference():
    return single_process_run()


def _assert_equal_to_reference(got, ref, tol=TOL):
    assert set(got) == set(ref)
    for name in ref:
        for key in ("param", "exp_avg", "block_exp_avg_sq"):
            assert got[name][key].shape == ref[name][key].shape, (name, key)
            d = max_rel_diff(got[name][key], ref[name][key])
            assert d <= tol, f"{name} {key}: relative difference {d:.2e} > {tol:.0e}"
        assert got[name]["step"].item() == ref[name]["step"].item() == STEPS, name


@pytest.mark.parametrize("world,run", [(2, "fsdp"), (3, "fsdp"), (4, "fsdp"), (2, "ddp")])
def test_parameters_and_full_state_equal_one_process(runs, reference, world, run):
    """Parameters, exp_avg (full_tensor) and the full gathered second moments after 10 steps."""
    _assert_equal_to_reference(runs[world][run], reference)


def test_the_reference_is_not_trivially_matched(runs, reference):
    """The comparison can fail: parameters moved, and every kind of block is present."""
    init = dict(tiny_model().named_parameters())
    moved = max(max_rel_diff(reference[n]["param"], init[n]) for n in reference)
    assert moved > 1e-3
    assert reference["blocks.0.mlp.proj.weight"]["block_exp_avg_sq"].numel() == 64  # columns
    assert reference["blocks.0.attn.q_proj.weight"]["block_exp_avg_sq"].numel() == 6  # heads


def test_collectives_per_step_do_not_grow_with_the_number_of_parameters(runs):
    r = runs[2]
    assert r["params_3_layers"] > 2 * r["params_1_layer"]
    assert r["shared_3_layers"] > 2 * r["shared_1_layer"] > 0  # more boundary blocks to reduce ...
    one_allreduce = {"c10d.allreduce_": 1}
    assert r["counts_1_layer"] == [one_allreduce] * STEPS  # ... in the same single collective
    assert r["groups_3_layers"] == 2
    assert r["counts_3_layers"] == [one_allreduce] * 2  # one buffer across both parameter groups
    assert r["counts_state_dict"] == one_allreduce  # the full second moments, all parameters at once


def test_dcp_checkpoint_at_world_2_resumed_at_world_3_equals_an_uninterrupted_run(runs, reference):
    r = runs[3]
    assert r["resumed_step"] == 5
    _assert_equal_to_reference(r["resumed"], reference)


def test_single_process_checkpoint_loaded_at_world_3_equals_an_uninterrupted_run(runs, reference):
    """torch.save by one process, load_state_dict on FSDP2 (exp_avg sliced to each rank's rows)."""
    _assert_equal_to_reference(runs[3]["from_plain"], reference)


def test_checkpoint_from_a_different_plan_is_rejected_naming_the_parameter(runs):
    r = runs[3]
    # fewer blocks: blockopt.distributed.checkpoint.load checks the saved plan before DCP reads tensors
    assert r["different_blocks_error"] is not None
    assert "different partition plan: parameter 'blocks.0.attn.v_proj.weight' was row x4" in r["different_blocks_error"]
    assert "here tensor x1" in r["different_blocks_error"]
    # same blocks, other weight-decay flag: the plain DCP recipe (set_optimizer_state_dict) catches it
    assert r["different_decay_error"] is not None
    assert "parameter 'blocks.0.attn.v_proj.weight' was row x4 (shape [4, 24], decay True)" in r["different_decay_error"]
    assert "decay False" in r["different_decay_error"]


def test_fsdp2_cpu_offload_on_gloo_equals_one_process(runs):
    """CPUOffloadPolicy(pin_memory=False) in float32, against a float32 single-process run."""
    _assert_equal_to_reference(runs[2]["offload"], single_process_run(dtype=torch.float32), tol=TOL_FP32)
