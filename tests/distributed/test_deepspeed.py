"""AdamMini as DeepSpeed's client optimizer under ZeRO stages 1, 2 and 3 (gloo on CPU,
``DS_ACCELERATOR=cpu``): equal to one process as closely as torch's AdamW is, resuming exactly from
``engine.save_checkpoint``, and with a constant number of collectives per step."""

from __future__ import annotations

import pytest
import torch
from dist_helpers import single_process_ds_run, spawn

pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install 'blockopt[deepspeed]')")

CASES = [(1, 3), (1, 4), (2, 3), (2, 4), (3, 3), (3, 4)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("deepspeed")
    got = {}
    # one set of processes per world size runs every stage; the world-4 processes then check the
    # error messages, and the world-3 ones try to load the world-4 ZeRO-2 checkpoint
    for world, then in ((4, "errors"), (3, "reshard:4")):
        spawn("worker_deepspeed", world, out, tuple(s for s, w in CASES if w == world), then)
    for stage, world in CASES:
        got[(stage, world)] = torch.load(out / f"ds{world}-{stage}.pt", weights_only=False)
    got["errors"] = torch.load(out / "ds-errors.pt", weights_only=False)
    got["reshard"] = torch.load(out / "ds-reshard.pt", weights_only=False)
    return got


def _worst(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(((a[n] - b[n]).abs().max() / b[n].abs().max()).item() for n in b)


@pytest.mark.parametrize("stage, world", CASES)
def test_zero_equals_one_process_as_closely_as_adamw_does(runs, stage, world):
    r = runs[(stage, world)]
    mini, adamw = _worst(r["adam-mini"], single_process_ds_run()), _worst(r["adamw"], single_process_ds_run(adamw=True))
    assert mini <= max(2e-6, 2 * adamw), (mini, adamw)
    assert set(r["routes"].values()) == {"zero"}
    moved = _worst(r["adam-mini"], {n: p for n, p in single_process_ds_run(0).items()})
    assert moved > 1e-3  # it trained


@pytest.mark.parametrize("stage, world", CASES)
def test_checkpoint_resumes_exactly(runs, stage, world):
    r = runs[(stage, world)]
    for n, p in r["adam-mini"].items():
        assert torch.equal(p, r["resumed"][n]), n


def test_one_collective_per_step_whatever_the_number_of_parameters(runs):
    """AdamMini's own step adds one all_reduce (the blocks split between ranks: heads of 4 rows over
    partitions of ~1,300 elements) for the model's 11 tensors, not one per tensor."""
    for r in (runs[case] for case in CASES):
        assert r["all_reduce_in_one_step"] == (1 if r["shared_blocks"] else 0)
    assert any(runs[case]["shared_blocks"] for case in CASES), {case: runs[case]["shared_blocks"] for case in CASES}


def test_clear_errors_without_attach_with_offload_and_at_another_world_size(runs):
    messages = runs["errors"]
    no_attach, offload = messages["no attach"], messages["offload"]
    assert no_attach.startswith("ValueError") and "blockopt.integrations.deepspeed.attach(engine)" in no_attach
    assert "KeyError" not in no_attach
    assert offload.startswith("ValueError") and "offload_optimizer is not supported" in offload

    reshard = runs["reshard"]
    # loading at another world size is refused, naming both sizes (DeepSpeed checks first; AdamMini's
    # own layout check would refuse a state that got through), and leaves the optimizer as it was
    assert reshard["message"] is not None and "world size of 4" in reshard["message"], reshard
    assert "current world size is 3" in reshard["message"]
    assert reshard["optimizer_untouched"]
