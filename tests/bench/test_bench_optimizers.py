"""The optimizer registry: every available entry builds and steps; shared decay mask; Muon split; C-AdamW."""

from __future__ import annotations

import copy
import sys

import pytest
import torch
from bench_helpers import keep_torch_threads  # noqa: F401 - fixture

from blockopt.bench.errors import BenchInputError
from blockopt.bench.metrics import optimizer_state_bytes
from blockopt.bench.optimizers import (
    REGISTRY,
    CautiousAdamW,
    ChainedOptimizer,
    Hyper,
    ModelInfo,
    build_optimizer,
    parse_optimizer,
)
from blockopt.models import build_model
from blockopt.partition import partition

SMALL = {"vocab_size": 64, "d_model": 32, "n_layers": 1, "n_heads": 4, "n_kv_heads": 2, "max_seq_len": 32}


def small_model(seed: int = 0):
    return build_model("llama-tiny", seed=seed, **SMALL)


def make(name: str, model, lr: float = 1e-2, **opts):
    choice = parse_optimizer(name)
    if opts:
        choice = parse_optimizer(name + "".join(f":{k}={v}" for k, v in opts.items()))
    return build_optimizer(choice, model, lr, Hyper(), plan=partition(model, warn=False),
                           info=ModelInfo(32, 4, 2))


def one_step(model, opt, seed: int = 0) -> float:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 64, (2, 17), generator=g)
    loss = model(x[:, :-1].contiguous(), x[:, 1:].contiguous())
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


@pytest.mark.parametrize("name", list(REGISTRY))
def test_every_available_optimizer_builds_and_steps(name):
    if REGISTRY[name].missing():
        pytest.skip(REGISTRY[name].missing())
    model = small_model()
    before = copy.deepcopy(model.state_dict())
    opt = make(name, model)
    one_step(model, opt)
    one_step(model, opt, seed=1)  # SOAP only sets up its preconditioner on the first step
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed, "no parameter moved"
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert optimizer_state_bytes(opt) > 0
    # the runner sets the learning rate through param_groups
    for g in opt.param_groups:
        g["lr"] = 0.5
    assert all(g["lr"] == 0.5 for g in opt.param_groups)


def test_adamw_uses_the_plans_decay_mask():
    model = small_model()
    opt = make("adamw", model)
    plan = partition(model, warn=False)
    names = {id(p): n for n, p in model.named_parameters()}
    for g in opt.param_groups:
        for p in g["params"]:
            assert (g["weight_decay"] > 0) == plan[names[id(p)]].weight_decay


def test_adam_mini_keeps_about_half_of_adamws_state():
    m1, m2 = small_model(), small_model()
    a, b = make("adamw", m1), make("adam-mini", m2)
    one_step(m1, a)
    one_step(m2, b)
    n = sum(p.numel() for p in m1.parameters())
    assert optimizer_state_bytes(a) == pytest.approx(8 * n, abs=64)
    assert optimizer_state_bytes(b) == pytest.approx(b.plan.state_bytes(), abs=64)


def test_value_single_block_option_reaches_the_plan():
    model = small_model()
    opt = make("adam-mini", model, value_single_block="true")
    v = [e for e in opt.plan.entries if e.role == "value"]
    assert v and all(e.num_blocks == 1 for e in v)


def test_muon_takes_hidden_matrices_and_adamw_the_rest():
    model = small_model()
    opt = make("muon", model)
    assert isinstance(opt, ChainedOptimizer)
    muon, adamw = opt.optimizers
    muon_ids = {id(p) for g in muon.param_groups for p in g["params"]}
    adamw_ids = {id(p) for g in adamw.param_groups for p in g["params"]}
    assert id(model.embed.weight) in adamw_ids and id(model.embed.weight) not in muon_ids
    assert id(model.blocks[0].attn.q_proj.weight) in muon_ids
    assert id(model.norm.weight) in adamw_ids
    assert muon_ids.isdisjoint(adamw_ids)
    assert muon_ids | adamw_ids == {id(p) for p in model.parameters()}
    # state dict round trip
    one_step(model, opt)
    sd = opt.state_dict()
    model2 = copy.deepcopy(model)
    opt2 = make("muon", model2)
    opt2.load_state_dict(copy.deepcopy(sd))  # state_dict() shares tensors with the live state
    one_step(model, opt, seed=1)
    one_step(model2, opt2, seed=1)
    for p, q in zip(model.parameters(), model2.parameters()):
        torch.testing.assert_close(p, q)


def test_cautious_adamw_first_step_is_adamw_rescaled():
    """On step 1 the update is sign(g) (bias-corrected m/sqrt(v)), which always agrees with g:
    nothing is masked and the update is AdamW's times numel / (numel + 1)."""
    torch.manual_seed(0)
    w = torch.randn(5, 7, dtype=torch.float64)
    g = torch.randn(5, 7, dtype=torch.float64)
    p1, p2 = w.clone().requires_grad_(), w.clone().requires_grad_()
    p1.grad, p2.grad = g.clone(), g.clone()
    CautiousAdamW([p1], lr=0.1, betas=(0.9, 0.95), weight_decay=0.0).step()
    torch.optim.AdamW([p2], lr=0.1, betas=(0.9, 0.95), weight_decay=0.0).step()
    torch.testing.assert_close(p1 - w, (p2 - w) * 35 / 36, rtol=1e-12, atol=1e-12)


def test_cautious_adamw_masks_disagreeing_directions():
    p = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    opt = CautiousAdamW([p], lr=1.0, betas=(0.9, 0.999), weight_decay=0.0)
    p.grad = torch.tensor([1.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    opt.step()
    before = p.detach().clone()
    p.grad = torch.tensor([-0.01, 1.0, 1.0, 1.0], dtype=torch.float64)  # momentum still says +1 for element 0
    opt.step()
    assert p[0].item() == before[0].item()  # masked
    assert (p[1:] < before[1:]).all()


@pytest.mark.parametrize("text, msg", [
    ("adamx", "unknown optimizer 'adamx'; available: adamw, adam-mini"),
    ("adamw:beta3=1", "bad option 'beta3=1' for adamw"),
    ("adamw:beta2=1.5", "adamw:beta2='1.5'"),
    ("adamw:beta2", "bad option 'beta2'"),
    ("adam-mini:value_single_block=maybe", "expected true or false"),
    ("adafactor:beta1=0.9", "bad option 'beta1=0.9' for adafactor"),
])
def test_parse_errors(text, msg):
    with pytest.raises(BenchInputError, match=msg):
        parse_optimizer(text)


def test_options_are_canonical():
    c = parse_optimizer("ADAMW:weight_decay=0:beta2=0.99")
    assert c.key == "adamw:beta2=0.99:weight_decay=0" and c.label == "AdamW (beta2=0.99, weight_decay=0)"
    assert c.hyper(Hyper()).beta2 == 0.99 and c.hyper(Hyper()).weight_decay == 0.0


def test_missing_package_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "adam_mini", None)
    with pytest.raises(BenchInputError, match=r"pip install 'blockopt\[official\]'"):
        parse_optimizer("adam-mini-official")
    assert parse_optimizer("adam-mini-official", check_installed=False).spec.name == "adam-mini-official"


def test_weights_option_makes_the_model_bf16_and_bad_values_name_the_choices():
    model = small_model()
    opt = make("adam-mini-default", model, weights="bf16+int8")
    assert opt.weights == "bf16+int8" and all(p.dtype == torch.bfloat16 for p in model.parameters())
    one_step(model, opt)
    assert all(opt.state[p]["weight_remainder"].dtype == torch.int8 for p in model.parameters())
    with pytest.raises(BenchInputError, match=r"adam-mini-default:weights='bf16'; expected one of fp32, bf16-sr, "
                                              r"bf16\+int8, bf16\+int16"):
        parse_optimizer("adam-mini-default:weights=bf16")
