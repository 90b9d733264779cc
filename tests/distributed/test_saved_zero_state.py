"""A DeepSpeed ZeRO-2 client state saved by main before the optimizer was reshaped (commit faf71cc,
world size 2; ``tests/fixtures/make_main_states.py``) still loads, unchanged, and steps."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from dist_helpers import spawn

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def test_a_zero_state_saved_by_main_loads_at_its_world_size(tmp_path):
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install 'blockopt[deepspeed]')")
    spawn("worker_deepspeed_saved_state", 2, tmp_path, str(FIXTURES / "adam_mini_zero_state_faf71cc.pt"))
    for rank in range(2):
        r = torch.load(tmp_path / f"ds-saved-{rank}.pt", weights_only=True)
        assert r["saved"]["state"], rank
        for pid, s in r["saved"]["state"].items():
            for k, v in s.items():
                assert torch.equal(r["loaded"]["state"][pid][k], v), (rank, pid, k)
        assert r["stepped"] == [4.0] * len(r["saved"]["state"])
