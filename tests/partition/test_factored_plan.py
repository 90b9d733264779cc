"""Factored entries in plans: which matrices the default factors, what the plan says and saves,
overrides, and the optimizer around them (routes, resume, refusals)."""

from __future__ import annotations

import copy

import pytest
import torch

import blockopt
from blockopt.models import build_model
from blockopt.partition import PartitionPlan


def _model():
    return build_model("llama-tiny", seed=0)


def test_the_default_factors_every_matrix_but_the_embedding_and_what_the_budget_made_per_element():
    plan = blockopt.AdamMini(_model(), lr=1e-3).plan
    assert plan.options["factored"] is True
    for e in plan.entries:
        if e.role == "embedding" or len(e.shape) < 2:
            assert e.kind != "factored", e.name
        elif e.kind != "element":
            assert e.kind == "factored" and e.num_blocks == sum(e.shape), e.name
            assert e.rule.startswith("factored: row and column second moments (was ")
    kinds = {e.kind for e in plan.entries}
    assert kinds == {"element", "factored"}
    assert plan.state_bytes() / plan.adamw_state_bytes() <= 0.55
    q = plan["blocks.0.attn.q_proj.weight"]
    assert q.describe() == "factored 128+128"
    assert "factored 128+128" in str(plan) and "factored 8,960" in str(plan)


def test_rules_blocks_is_the_same_table_and_budget_without_factoring():
    blocks = blockopt.AdamMini(_model(), lr=1e-3, rules="blocks").plan
    assert blocks == blockopt.partition(_model(), snr="builtin", state_budget=0.55)
    assert "factored" not in {e.kind for e in blocks.entries}


def test_a_factored_plan_round_trips_through_json_and_the_optimizer_state():
    model = _model()
    opt = blockopt.AdamMini(model, lr=1e-3)
    again = PartitionPlan.from_json(opt.plan.to_json())
    assert again == opt.plan
    x = torch.randint(0, 256, (2, 17))
    model(x[:, :-1], x[:, 1:]).backward()
    opt.step()
    p = dict(model.named_parameters())["blocks.0.mlp.fc.weight"]
    assert opt.state[p]["block_exp_avg_sq"].shape == (384 + 128,)
    again_opt = blockopt.AdamMini(_model(), lr=1e-3)
    again_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    q = dict(again_opt.param_entries.items())
    assert [e.kind for e in q.values()] == [e.kind for e in opt.param_entries.values()]


def test_override_kind_factored_and_its_errors():
    model = _model()
    plan = blockopt.partition(model, overrides={r".*\.q_proj\.weight": "factored"})
    assert plan["blocks.1.attn.q_proj.weight"].kind == "factored"
    assert plan["blocks.1.attn.k_proj.weight"].kind == "head"
    with pytest.raises(ValueError, match=r"Invalid overrides\['norm\\\\.weight'\]: kind 'factored' needs a 2-D "
                                         r"tensor, but 'norm\.weight' has shape \[128\]"):
        blockopt.partition(model, overrides={r"norm\.weight": "factored"})
    with pytest.raises(ValueError, match=r"Invalid factored: 'yes'; expected True or False"):
        blockopt.partition(model, factored="yes")
    # a user's kind wins over factoring
    plan = blockopt.partition(model, factored=True, overrides={r".*\.fc\.weight": "row"})
    assert plan["blocks.0.mlp.fc.weight"].kind == "row" and plan["blocks.0.mlp.proj.weight"].kind == "factored"


def _train(model, opt, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x = torch.randint(0, 256, (2, 17), generator=g)
        model(x[:, :-1], x[:, 1:]).backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("fused", [None, False])
def test_resume_of_the_default_is_bit_for_bit_and_the_routes_are_named(fused):
    model = _model()
    whole = copy.deepcopy(model)
    opt = blockopt.AdamMini(whole, lr=3e-3, weight_decay=0.1, fused=fused)
    _train(whole, opt, 6)
    first = copy.deepcopy(model)
    opt1 = blockopt.AdamMini(first, lr=3e-3, weight_decay=0.1, fused=fused)
    _train(first, opt1, 3)
    saved = copy.deepcopy(opt1.state_dict())
    resumed = copy.deepcopy(first)
    opt2 = blockopt.AdamMini(resumed, lr=3e-3, weight_decay=0.1, fused=fused)
    opt2.load_state_dict(saved)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):  # the same batches as steps 1-3 of the whole run were drawn; skip them
        torch.randint(0, 256, (2, 17), generator=g)
    for _ in range(3):
        x = torch.randint(0, 256, (2, 17), generator=g)
        resumed(x[:, :-1], x[:, 1:]).backward()
        opt2.step()
        opt2.zero_grad()
    for a, b in zip(whole.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    want = "foreach" if fused is False else "fused_cpu"
    if fused is None and blockopt.kernels.load_cpu_kernel() is None:
        want = "foreach"
    assert opt2.routes["blocks.0.mlp.fc.weight"] == want


def test_zero_refuses_factored_plans_naming_rules_blocks():
    opt = blockopt.AdamMini(_model(), lr=1e-3)
    with pytest.raises(ValueError, match=r"Invalid plan for DeepSpeed ZeRO: \d+ parameter\(s\) \(first "
                                         r"'blocks\.0\.attn\.q_proj\.weight'\) have factored second moments .*"
                                         r"rules='blocks'"):
        opt.attach_zero([], None)
    assert opt.zero_layouts == {}


def test_mofo_steps_a_factored_plan_as_adam_mini_does_at_fraction_one():
    model = _model()
    plan = blockopt.partition(model, snr="builtin", factored=True, state_budget=0.55)
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    kw = {"lr": 3e-3, "betas": (0.9, 0.95), "weight_decay": 0.1}
    mini = blockopt.AdamMini(a.named_parameters(), plan=plan, foreach=False, **kw)
    mofo = blockopt.MoFO(b, plan=plan, fraction=1.0, second_moment="block", **kw)
    _train(a, mini, 3)
    _train(b, mofo, 3)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(p, q, rtol=1e-5, atol=1e-7), name


def test_a_state_saved_with_the_blocks_default_is_refused_by_the_new_default_and_loads_into_rules_blocks():
    model = _model()
    old = blockopt.AdamMini(model, lr=1e-3, rules="blocks")
    _train(model, old, 1)
    saved = copy.deepcopy(old.state_dict())
    new = blockopt.AdamMini(model, lr=1e-3)
    before = copy.deepcopy(new.state_dict())
    with pytest.raises(ValueError, match=r"was row x128 .*here factored 128\+128 .*AdamMini\(model\) factors matrices "
                                         r"since 0\.2\.0: a state saved with the built-in table's blocks loads into "
                                         r"rules='blocks'"):
        new.load_state_dict(saved)
    assert new.state_dict()["state"] == before["state"]
    again = blockopt.AdamMini(model, lr=1e-3, rules="blocks")
    again.load_state_dict(saved)
    assert len(again.state) == len(old.state)
