"""State budgets (partition(state_budget=...), AdamMini(state_budget=...)) and AdamMini(rules=...)."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

import blockopt
from blockopt.bench.metrics import optimizer_state_bytes
from blockopt.models import build_model
from blockopt.partition import PartitionPlan
from blockopt.partition.budget import apply_state_budget


def _model():
    return build_model("llama-tiny", seed=0)


def _ratio(plan):
    return plan.state_bytes() / plan.adamw_state_bytes()


@pytest.mark.parametrize("snr", [None, "builtin"])
@pytest.mark.parametrize("budget", [0.55, 0.6, 1.0])
def test_the_budget_is_spent_up_to_its_limit_and_never_past_it(snr, budget):
    model = _model()
    base = blockopt.partition(model, snr=snr)
    plan = blockopt.partition(model, snr=snr, state_budget=budget)
    assert _ratio(plan) <= budget
    bought = [e for e in plan.entries if e.rule.startswith(f"state budget {budget:g}")]
    assert bought and all(e.kind == "element" and base[e.name].kind != "element" for e in bought)
    # whatever is left is smaller than every tensor not bought (greedy: none of them fits any more)
    left = budget * plan.adamw_state_bytes() - plan.state_bytes()
    not_bought = [e for e in plan.trained if e.kind != "element"]
    assert all(4 * (e.numel - e.num_blocks) > left for e in not_bought)
    # only the budget's tensors changed; the embedding (= tied output) is the first rule-decided one bought
    assert {e.name for e in plan.entries if e != base[e.name]} == {e.name for e in bought}
    assert plan["embed.weight"].kind == "element"
    if budget == 1.0:
        assert not not_bought and math.isclose(_ratio(plan), 1.0, rel_tol=1e-12)
    text = str(plan)
    assert f"state budget {budget:g}x of AdamW's: per-element second moments for {len(bought)} tensors" in text
    assert plan.options["state_budget"] == budget


def test_tensors_chosen_from_data_are_bought_lowest_snr_first():
    model = _model()
    base = blockopt.partition(model, snr="builtin")
    low, high = "blocks.2.mlp.fc.weight", "blocks.1.mlp.fc.weight"  # same shape: only the SNR differs
    plan = base.replace_entries({low: replace(base[low], snr=(("row", 1.2),), snr_choice="row"),
                                 high: replace(base[high], snr=(("row", 9.0),), snr_choice="row")})
    room = plan.state_bytes() / plan.adamw_state_bytes() + 1.5 * (plan[low].numel - plan[low].num_blocks) / (
        2 * plan.num_params)
    out = apply_state_budget(plan, room)
    assert out[low].kind == "element" and "SNR 1.20 of row" in out[low].rule
    assert out[high].kind == "row"  # no room left for the second one


def test_plan_with_a_budget_round_trips_through_json(tmp_path):
    plan = blockopt.partition(_model(), state_budget=0.55)
    path = tmp_path / "plan.json"
    plan.save(path)
    again = PartitionPlan.load(path)
    assert again.entries == plan.entries and again.options["state_budget"] == 0.55


BAD_BUDGETS = [
    (0.5, r"Invalid state_budget: 0\.5; expected a number in \(0\.5, 1\]"),
    (1.01, r"Invalid state_budget: 1\.01; expected a number in \(0\.5, 1\]"),
    ("0.55", r"Invalid state_budget: '0\.55'; expected a number"),
    (True, r"Invalid state_budget: True; expected a number"),
    (float("nan"), r"Invalid state_budget: nan; expected a number"),
    (0.501, (r"Invalid state_budget: 0\.501; this model's plan needs at least 0\.5028x of AdamW's state .*allowed: "
            r"a number in \[0\.5028, 1\]")),
]


@pytest.mark.parametrize("budget, match", BAD_BUDGETS)
def test_a_bad_budget_is_a_clear_error_and_changes_nothing(budget, match):
    model = _model()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=match):
        blockopt.partition(model, state_budget=budget)
    with pytest.raises(ValueError, match=match):
        blockopt.AdamMini(model, rules="official", state_budget=budget)
    plan = blockopt.partition(model)
    with pytest.raises(ValueError, match=match):
        blockopt.AdamMini(model.named_parameters(), plan=plan, state_budget=budget)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("kw, match", [
    ({"rules": "nope"}, r"Invalid rules: 'nope'; allowed: 'builtin', 'blocks', 'official'"),
    ({"rules": "builtin", "plan": "structural"}, r"Invalid rules='builtin' with plan=: the plan already decides"),
    ({"state_budget": 0.55, "calibrate": 10, "calibrate_state": "adamw"},
     r"Invalid state_budget with calibrate_state='adamw': that calibration window keeps"),
    ({"state_budget": 0.501}, r"Invalid state_budget: 0\.501; this model's plan needs at least 0\.5068x"),  # builtin
    ({"state_budget": 0.501, "rules": "blocks"}, r"Invalid state_budget: 0\.501; this model's plan needs at least 0\.5046x"),
])
def test_bad_rules_and_combinations_are_clear_errors(kw, match):
    model = _model()
    if kw.get("plan") == "structural":
        kw = {**kw, "plan": blockopt.partition(model)}
    with pytest.raises(ValueError, match=match):
        blockopt.AdamMini(model, **kw)


def _steps(model, opt, n=3):
    g = torch.Generator().manual_seed(0)
    for _ in range(n):
        x = torch.randint(0, 256, (2, 17), generator=g)
        model(x[:, :-1], x[:, 1:]).backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("kw, plan_kw", [
    ({}, {"snr": "builtin", "factored": True, "state_budget": 0.55}),  # the default
    ({"rules": "blocks"}, {"snr": "builtin", "state_budget": 0.55}),
    ({"rules": "official", "state_budget": 0.55}, {"state_budget": 0.55}),
    ({"rules": "builtin", "state_budget": None}, {"snr": "builtin", "factored": True}),
    ({"rules": "builtin", "state_budget": 0.6}, {"snr": "builtin", "factored": True, "state_budget": 0.6}),
    ({"rules": "official"}, {}),
])
def test_adam_mini_with_rules_and_budget_equals_the_plan_it_names_and_measures_within_it(kw, plan_kw):
    a, b = _model(), _model()
    opt_a = blockopt.AdamMini(a, lr=3e-3, weight_decay=0.1, **kw)
    opt_b = blockopt.AdamMini(b, lr=3e-3, weight_decay=0.1, plan=blockopt.partition(b, **plan_kw))
    assert opt_a.plan.entries == opt_b.plan.entries
    _steps(a, opt_a)
    _steps(b, opt_b)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    adamw_bytes = 8 * sum(p.numel() for p in a.parameters())
    measured = optimizer_state_bytes(opt_a)  # + one 4-byte step counter per tensor
    budget = plan_kw.get("state_budget") or 0.52
    assert measured <= budget * adamw_bytes + 4 * len(opt_a.plan.entries)


def test_the_default_budget_gives_way_on_a_model_whose_blocks_alone_exceed_it():
    """A model of many small tensors: the default keeps its plan and says so; an explicit budget is an error."""
    model = torch.nn.Sequential(*[torch.nn.LayerNorm(8) for _ in range(4)], torch.nn.Linear(8, 8))
    with pytest.warns(UserWarning, match=r"plan alone keeps 0\.\d+x of AdamW's optimizer state, above the default"):
        opt = blockopt.AdamMini(model)
    assert "state_budget" not in opt.plan.options and _ratio(opt.plan) > 0.55
    with pytest.raises(ValueError, match=r"Invalid state_budget: 0\.55; this model's plan needs at least"):
        blockopt.AdamMini(model, state_budget=0.55)


def test_a_given_plan_is_brought_within_the_budget():
    model = _model()
    opt = blockopt.AdamMini(model.named_parameters(), plan=blockopt.partition(model), state_budget=0.55)
    assert opt.plan.options["state_budget"] == 0.55 and 0.54 < _ratio(opt.plan) <= 0.55
