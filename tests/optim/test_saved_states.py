"""States saved by earlier code still load, and the run goes on as it would have.

``tests/fixtures/make_main_states.py`` wrote the fixtures with main before the optimizer was reshaped
(commit faf71cc): an in-run calibration state in each phase, and a DeepSpeed ZeRO-2 client state at
world size 2 (tested in ``tests/distributed/test_saved_zero_state.py``). The 0.1.0 state is tested
in ``test_snr_calibration.py``."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import blockopt

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
sys.path.insert(0, str(FIXTURES))
from make_main_states import CALIB_KW, batches, make_model, train

sys.path.pop(0)

#: what AdamMini(calibrate=N) meant when the fixtures were saved (before 0.2.0): the official rules'
#: structure and AdamW's state for the window
BEFORE_0_2 = {"rules": "official", "calibrate_state": "adamw"}


@pytest.mark.parametrize("phase, steps", [("calibrating", 2), ("done", 5)])
def test_a_calibrate_state_saved_by_main_resumes_as_it_would_have(phase, steps):
    saved = torch.load(FIXTURES / "adam_mini_calibrate_state_faf71cc.pt", weights_only=True)[phase]
    model = make_model()
    model.load_state_dict(saved["model"])
    with pytest.raises(ValueError, match="calibrate_state='adamw'"):  # today's default window is refused, clearly
        blockopt.AdamMini(make_model(), **CALIB_KW).load_state_dict(saved["optimizer"])
    opt = blockopt.AdamMini(model, **CALIB_KW, **BEFORE_0_2)
    opt.load_state_dict(saved["optimizer"])
    assert opt.calibration.phase == phase and opt.calibration.steps_done == min(steps, CALIB_KW["calibrate"])
    if phase == "done":
        assert opt.plan != blockopt.partition(make_model())  # the SNR plan it had switched to
    train(model, opt, batches(steps + 1)[steps:])
    assert opt.calibration.phase == "done"
    for n, p in model.named_parameters():
        torch.testing.assert_close(p, saved["params_one_step_later"][n], rtol=0, atol=1e-6, msg=n)


def test_a_calibrate_state_refuses_an_optimizer_without_calibrate_and_changes_nothing():
    saved = torch.load(FIXTURES / "adam_mini_calibrate_state_faf71cc.pt", weights_only=True)["done"]
    opt = blockopt.AdamMini(make_model(), rules="official", **{k: v for k, v in CALIB_KW.items() if k != "calibrate"})
    with pytest.raises(ValueError, match="calibrate"):
        opt.load_state_dict(saved["optimizer"])
    assert not opt.state
