"""AdamMini against its references: AdamW, the plain loop, the official release."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from conftest import TOL, max_rel_diff, token_batches, train
from torch import nn

import blockopt
from blockopt.bench.models import build_model

ALL_ELEMENTS = {".*": {"kind": "element", "weight_decay": True}}


def tiny(style="llama", **kw):
    name = "llama-tiny" if style == "llama" else "gpt2-tiny"
    kw.setdefault("n_layers", 2)
    kw.setdefault("d_model", 64)
    return build_model(name, vocab_size=64, **kw)


# (AdamMini options, dtype, the AdamW it must equal, tolerance)
_DEGENERATE = {
    # the default path: per-element blocks go to torch's fused AdamW kernel, so it is bit for bit AdamW(fused=True)
    "default": ({}, torch.float32, {"fused": True}, 0.0),
    # the foreach path does AdamW's foreach arithmetic
    "foreach": ({"fused": False}, torch.float32, {"foreach": False}, 1e-6),
    # the reference loop (plainer arithmetic) in float64
    "reference": ({"foreach": False}, torch.float64, {"foreach": False}, 1e-10),
}


@pytest.mark.parametrize("path", sorted(_DEGENERATE))
def test_every_block_of_size_one_equals_adamw(path):
    options, dtype, adamw_options, tol = _DEGENERATE[path]
    model = tiny().to(dtype)
    ref = copy.deepcopy(model)
    opt = blockopt.AdamMini(model, rules="official", lr=2e-3, betas=(0.9, 0.95), weight_decay=0.1,
                            overrides=ALL_ELEMENTS, **options)
    assert all(e.kind == "element" for e in opt.plan.entries)
    adamw = torch.optim.AdamW(ref.parameters(), lr=2e-3, betas=(0.9, 0.95), weight_decay=0.1, **adamw_options)
    batches = token_batches(64, 50)
    train(model, opt, batches)
    train(ref, adamw, batches)
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert max_rel_diff(p, q) <= tol, name
        s, t = opt.state[p], adamw.state[q]
        assert max_rel_diff(s["exp_avg"], t["exp_avg"]) <= tol, name
        assert max_rel_diff(s["block_exp_avg_sq"], t["exp_avg_sq"]) <= tol, name
        assert s["step"].item() == t["step"].item() == 50


def _float64_models():
    models = [tiny("llama").double(), tiny("gpt2").double()]
    models.append(nn.Sequential(nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)).double())
    return models


@pytest.mark.parametrize("index", [0, 1, 2])
@pytest.mark.parametrize("maximize", [False, True])
def test_foreach_equals_reference_loop_float64(index, maximize):
    model = _float64_models()[index]
    other = copy.deepcopy(model)
    kw = {"lr": 1e-2, "betas": (0.8, 0.99), "eps": 1e-7, "weight_decay": 0.05, "maximize": maximize}
    fast = blockopt.AdamMini(model, rules="official", foreach=True, **kw)
    slow = blockopt.AdamMini(other, rules="official", foreach=False, **kw)
    kinds = {e.kind for e in fast.plan.entries}
    assert {"head", "row", "tensor"} <= kinds or "fused" in kinds
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        for p, q in zip(model.parameters(), other.parameters()):
            grad = torch.randn(p.shape, generator=g, dtype=torch.float64)
            p.grad, q.grad = grad.clone(), grad.clone()
        fast.step()
        slow.step()
    for (name, p), q in zip(model.named_parameters(), other.parameters()):
        assert max_rel_diff(p, q) <= TOL[torch.float64], name
        assert max_rel_diff(fast.state[p]["exp_avg"], slow.state[q]["exp_avg"]) <= TOL[torch.float64], name
        assert max_rel_diff(fast.state[p]["block_exp_avg_sq"], slow.state[q]["block_exp_avg_sq"]) <= TOL[torch.float64], name


def test_hf_gpt2_conv1d_and_fused_qkv_foreach_equals_reference():
    transformers = pytest.importorskip("transformers", reason="needs the [hf] extra: pip install 'blockopt[hf]'")
    cfg = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=16,
                                  attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).double()
    other = copy.deepcopy(model)
    fast = blockopt.AdamMini(model, rules="official", lr=1e-2, weight_decay=0.1)
    slow = blockopt.AdamMini(other, rules="official", lr=1e-2, weight_decay=0.1, foreach=False)
    assert fast.plan["transformer.h.0.attn.c_attn.weight"].kind == "fused"
    assert fast.plan["transformer.h.0.mlp.c_fc.weight"].kind == "column"
    x = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    for _ in range(10):
        for m, o in ((model, fast), (other, slow)):
            o.zero_grad()
            m(input_ids=x, labels=x).loss.backward()
            o.step()
    for (name, p), q in zip(model.named_parameters(), other.parameters()):
        assert max_rel_diff(p, q) <= 1e-10, name


# float64 pins the semantics (measured: 1.4e-15 after 20 steps); float32 runs the default fast path,
# where 20 steps of reordered fp32 sums leave ~1e-6 (measured: 8.7e-7 with the C++ kernel, 1.14e-6 on
# k_proj's momentum with BLOCKOPT_DISABLE_CPU_KERNEL=1, the foreach path)
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
def test_equals_official_adam_mini_1_1_1(dtype, tol):
    official = pytest.importorskip(
        "adam_mini", reason="the official adam-mini package is not installed (pip install 'blockopt[official]')"
    )
    # untied head and names the official release recognises: embed, q_proj/k_proj, v_proj, o_proj, mlp, lm_head,
    # ln_*/norm (no decay), *.bias (per-element Adam), wpe (one block)
    model = tiny("gpt2", tie_embeddings=False).to(dtype)
    # the key bias cannot change attention (softmax is shift invariant): its gradient is pure rounding
    # noise, on which two correct implementations legitimately diverge; freeze it in both
    for block in model.blocks:
        block.attn.k_proj.bias.requires_grad_(False)
    ref = copy.deepcopy(model)
    ours = blockopt.AdamMini(model, rules="official", lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    theirs = official.Adam_mini(ref.named_parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1,
                                dim=64, n_heads=4, verbose=False)
    batches = token_batches(64, 20)
    train(model, ours, batches)
    train(ref, theirs, batches)
    checked = 0
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert max_rel_diff(p, q) <= tol, name
        if not p.requires_grad:
            continue
        s, t = ours.state[p], theirs.state[q]
        v_theirs = t["vmean"] if "vmean" in t else t["v"]
        assert s["block_exp_avg_sq"].numel() == v_theirs.numel(), name
        assert max_rel_diff(s["exp_avg"], t["m"].reshape(p.shape)) <= tol, name
        assert max_rel_diff(s["block_exp_avg_sq"], v_theirs.reshape(-1)) <= tol, name
        checked += 1
    assert checked == sum(p.requires_grad for p in model.parameters())


def test_state_of_gpt2_small_shape_is_at_most_051x_adamw():
    model = build_model("gpt2-160m", seed=None)  # GPT-2 small with an untied head; values do not matter
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    ours = blockopt.AdamMini(model, rules="official")
    ours.step()
    ours_bytes = sum(t.nbytes for s in ours.state.values() for t in s.values() if isinstance(t, torch.Tensor))
    del ours
    adamw = torch.optim.AdamW(model.parameters(), fused=True)
    adamw.step()
    adamw_bytes = sum(t.nbytes for s in adamw.state.values() for t in s.values() if isinstance(t, torch.Tensor))
    assert ours_bytes / adamw_bytes <= 0.51, (ours_bytes, adamw_bytes)


def _save_load_continue(dtype):
    model = tiny("gpt2").to(dtype)
    opt = blockopt.AdamMini(model, rules="official", lr=1e-3, weight_decay=0.1)
    batches = token_batches(64, 10)
    train(model, opt, batches[:5])
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    train(model, opt, batches[5:])

    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    resumed = tiny("gpt2").to(dtype)
    resumed.load_state_dict(ckpt["model"])
    opt2 = blockopt.AdamMini(resumed, rules="official", lr=1e-3, weight_decay=0.1)
    opt2.load_state_dict(ckpt["opt"])
    train(resumed, opt2, batches[5:])
    return model, opt, resumed, opt2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_dict_save_load_continue_is_bit_identical(dtype):
    model, opt, resumed, opt2 = _save_load_continue(dtype)
    for (name, p), q in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), name
        assert opt2.state[q]["exp_avg"].dtype == torch.float32  # fp32 state even for bf16 parameters
        assert torch.equal(opt.state[p]["exp_avg"], opt2.state[q]["exp_avg"]), name
        assert torch.equal(opt.state[p]["block_exp_avg_sq"], opt2.state[q]["block_exp_avg_sq"]), name


def test_load_state_dict_from_a_different_plan_names_the_parameter_and_changes_nothing():
    model = tiny()
    opt = blockopt.AdamMini(model, rules="official")
    train(model, opt, token_batches(64, 2))
    saved = opt.state_dict()
    other = blockopt.AdamMini(model, rules="official", value_single_block=True)
    train(model, other, token_batches(64, 1))
    before = copy.deepcopy(other.state_dict())
    with pytest.raises(ValueError, match=r"different partition plan: parameter 'blocks\.0\.attn\.v_proj\.weight'"):
        other.load_state_dict(saved)
    after = other.state_dict()
    for pid, s in before["state"].items():
        for k, v in s.items():
            assert torch.equal(v, after["state"][pid][k])


def test_state_dict_holds_the_plan_and_groups():
    model = tiny()
    opt = blockopt.AdamMini(model, rules="official", lr=3e-4)
    sd = opt.state_dict()
    assert set(sd["plan"]) == {n for n, _ in model.named_parameters()}
    assert sd["plan"]["blocks.0.attn.q_proj.weight"]["kind"] == "head"
    assert sd["param_groups"][0]["param_names"] == [n for n, _ in model.named_parameters()]


def test_param_groups_carry_the_plan_so_it_survives_without_the_top_level_key():
    """DCP's get_optimizer_state_dict keeps only "state" and "param_groups": the plan must live there."""
    import json

    model = tiny()
    opt = blockopt.AdamMini(model, rules="official")
    train(model, opt, token_batches(64, 1))
    sd = opt.state_dict()
    block_plan = sd["param_groups"][0]["block_plan"]
    assert [json.loads(e)["name"] for e in block_plan] == sd["param_groups"][0]["param_names"]
    assert blockopt.PlanEntry.from_dict(json.loads(block_plan[1])) == opt.plan.entries[1]

    groups_only = {"state": sd["state"], "param_groups": sd["param_groups"]}
    other = blockopt.AdamMini(model, rules="official", value_single_block=True)
    with pytest.raises(ValueError, match=r"different partition plan: parameter 'blocks\.0\.attn\.v_proj\.weight'"):
        other.load_state_dict(groups_only)
    same = blockopt.AdamMini(model, rules="official")
    same.load_state_dict(groups_only)
    assert torch.equal(same.state_dict()["state"][0]["exp_avg"], sd["state"][0]["exp_avg"])

    old_format = {**sd, "param_groups": [{k: v for k, v in g.items() if k != "block_plan"}
                                         for g in sd["param_groups"]]}
    blockopt.AdamMini(model, rules="official").load_state_dict(old_format)  # top-level "plan" only: still accepted
    no_plan = {"state": sd["state"], "param_groups": old_format["param_groups"]}
    with pytest.raises(ValueError, match="it has no plan"):
        blockopt.AdamMini(model, rules="official").load_state_dict(no_plan)


# --- torch.optim conventions ---------------------------------------------------

def test_closure_is_called_and_its_loss_returned():
    model = tiny()
    opt = blockopt.AdamMini(model, rules="official")
    x = token_batches(64, 1)[0]
    calls = []

    def closure():
        opt.zero_grad()
        loss = model(x, x)
        loss.backward()
        calls.append(loss.item())
        return loss

    before = [p.clone() for p in model.parameters()]
    loss = opt.step(closure)
    assert calls == [loss.item()]
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_lr_scheduler_drives_the_group_lr():
    model = tiny()
    opt = blockopt.AdamMini(model, rules="official", lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.0 if step == 1 else 1.0)
    batches = token_batches(64, 3)
    train(model, opt, batches[:1])
    sched.step()  # lr is now 0
    assert opt.param_groups[0]["lr"] == 0.0
    before = [p.clone() for p in model.parameters()]
    train(model, opt, batches[1:2])
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-2)


def test_user_param_groups_keep_their_lr_and_weight_decay():
    model = tiny()
    plan = blockopt.partition(model)
    named = list(model.named_parameters())
    attn = [(n, p) for n, p in named if ".attn." in n]
    rest = [(n, p) for n, p in named if ".attn." not in n]
    opt = blockopt.AdamMini([{"params": attn, "lr": 0.0}, {"params": rest, "weight_decay": 0.5}], lr=1e-2, plan=plan)
    assert [g["lr"] for g in opt.param_groups] == [0.0, 1e-2]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.0, 0.5]
    before = {n: p.clone() for n, p in attn}
    train(model, opt, token_batches(64, 2))
    assert all(torch.equal(before[n], p) for n, p in attn)


def test_params_without_grad_and_frozen_params_are_left_alone():
    model = tiny()
    model.blocks[0].mlp.fc.weight.requires_grad_(False)
    opt = blockopt.AdamMini(model, rules="official")
    frozen = model.blocks[0].mlp.fc.weight.clone()
    train(model, opt, token_batches(64, 2))
    assert torch.equal(frozen, model.blocks[0].mlp.fc.weight)
    assert model.blocks[0].mlp.fc.weight not in opt.state
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    before = [p.clone() for p in model.parameters()]
    opt.step()  # no gradients at all: nothing moves
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_maximize_equals_minimising_the_negated_gradient():
    a, b = tiny(), tiny()
    oa = blockopt.AdamMini(a, rules="official", lr=1e-2, maximize=True)
    ob = blockopt.AdamMini(b, rules="official", lr=1e-2)
    g = torch.Generator().manual_seed(3)
    for _ in range(3):
        for p, q in zip(a.parameters(), b.parameters()):
            grad = torch.randn(p.shape, generator=g)
            p.grad, q.grad = grad, -grad
        oa.step()
        ob.step()
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_bf16_parameters_keep_fp32_state_and_follow_the_fp32_reference():
    model = tiny().to(torch.bfloat16)
    ref = copy.deepcopy(model)
    opt = blockopt.AdamMini(model, rules="official", lr=1e-3)
    ref_opt = blockopt.AdamMini(ref, rules="official", lr=1e-3, foreach=False)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        for p, q in zip(model.parameters(), ref.parameters()):
            grad = torch.randn(p.shape, generator=g).to(torch.bfloat16)
            p.grad, q.grad = grad, grad.clone()
        opt.step()
        ref_opt.step()
    for p, q in zip(model.parameters(), ref.parameters()):
        assert opt.state[p]["exp_avg"].dtype == torch.float32
        assert opt.state[p]["block_exp_avg_sq"].dtype == torch.float32
        torch.testing.assert_close(p, q, atol=1e-2, rtol=TOL[torch.bfloat16])
    low = blockopt.AdamMini(tiny().to(torch.bfloat16), rules="official", state_dtype=torch.bfloat16)
    p0 = next(iter(low.param_groups[0]["params"]))
    p0.grad = torch.ones_like(p0)
    low.step()
    assert low.state[p0]["exp_avg"].dtype == torch.bfloat16


def test_optimizer_survives_deepcopy():
    model = tiny()
    opt = blockopt.AdamMini(model, rules="official")
    train(model, opt, token_batches(64, 1))
    clone = copy.deepcopy(opt)
    assert clone.plan == opt.plan
    clone.step()  # uses its own parameter -> entry map


# --- bad input -----------------------------------------------------------------

def _model_kwargs(**kw):
    return lambda: (tiny(), kw)


BAD_INPUT = [
    # (id, kwargs for AdamMini(model, rules="official", ...), exception, words the message must contain)
    ("negative lr", {"lr": -1.0}, ValueError, ["lr", "-1.0"]),
    ("nan lr", {"lr": math.nan}, ValueError, ["lr", "nan"]),
    ("beta1 = 1", {"betas": (1.0, 0.999)}, ValueError, ["beta", "index 0", "1.0"]),
    ("negative beta2", {"betas": (0.9, -0.1)}, ValueError, ["beta", "index 1", "-0.1"]),
    ("one beta", {"betas": (0.9,)}, ValueError, ["betas", "(0.9,)"]),
    ("negative eps", {"eps": -1e-8}, ValueError, ["eps", "-1e-08"]),
    ("negative weight decay", {"weight_decay": -0.1}, ValueError, ["weight_decay", "-0.1"]),
    ("heads that do not divide", {"num_heads": 3}, ValueError, ["num_heads=3", "q_proj"]),
    ("zero heads", {"num_heads": 0}, ValueError, ["num_heads", "0"]),
    ("override matching nothing", {"overrides": {"encoder\\..*": "row"}}, ValueError, ["overrides", "encoder\\\\..*"]),
    ("unknown override kind", {"overrides": {".*": "diagonal"}}, ValueError, ["overrides", "diagonal"]),
    ("bad state dtype", {"state_dtype": torch.int8}, ValueError, ["state_dtype", "torch.int8"]),
]


@pytest.mark.parametrize("kwargs,exc,words", [b[1:] for b in BAD_INPUT], ids=[b[0] for b in BAD_INPUT])
def test_bad_arguments_raise_clear_errors(kwargs, exc, words):
    with pytest.raises(exc) as info:
        blockopt.AdamMini(tiny(), rules="official", **kwargs)
    for w in words:
        assert w in str(info.value), (w, str(info.value))


def test_bad_param_group_lr_is_rejected_and_not_added():
    model = tiny()
    named = list(model.named_parameters())
    opt = blockopt.AdamMini(named[:2], plan=blockopt.partition(model))
    with pytest.raises(ValueError, match=r"Invalid lr: -0\.5"):
        opt.add_param_group({"params": named[2:4], "lr": -0.5})
    assert len(opt.param_groups) == 1


def test_unnamed_parameters_and_missing_plan_are_explained():
    model = tiny()
    with pytest.raises(ValueError, match="named_parameters"):
        blockopt.AdamMini(model.parameters(), plan=blockopt.partition(model))
    with pytest.raises(ValueError, match="Invalid plan: None"):
        blockopt.AdamMini(model.named_parameters())
    with pytest.raises(ValueError, match="partition hints"):
        blockopt.AdamMini(model.named_parameters(), plan=blockopt.partition(model), num_heads=4)
    with pytest.raises(ValueError, match="'nope.weight' is not in the plan"):
        blockopt.AdamMini([("nope.weight", nn.Parameter(torch.zeros(2, 2)))], plan=blockopt.partition(model))


def test_sparse_gradients_are_rejected_before_anything_changes():
    emb = nn.Embedding(10, 4, sparse=True)
    model = nn.Sequential(emb, nn.Linear(4, 2))
    opt = blockopt.AdamMini(model, rules="official")
    model(torch.tensor([1, 2])).sum().backward()
    before = [p.clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert len(opt.state) == 0


@pytest.mark.parametrize("kind", ["row", "column", "head:2", "tensor", "element"])
def test_non_contiguous_parameters_follow_the_reference(kind):
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 6, generator=torch.Generator().manual_seed(0)).t())  # [6, 4], strided
            self.lin = nn.Linear(4, 3)

    a, b = Model(), Model()
    b.load_state_dict(a.state_dict())
    assert not a.w.is_contiguous()
    fast = blockopt.AdamMini(a, rules="official", lr=1e-2, overrides={"w": kind})
    slow = blockopt.AdamMini(b, rules="official", lr=1e-2, overrides={"w": kind}, foreach=False)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        for p, q in zip(a.parameters(), b.parameters()):
            grad = torch.randn(p.shape, generator=g)
            p.grad, q.grad = grad, grad.clone()
        fast.step()
        slow.step()
    for p, q in zip(a.parameters(), b.parameters()):
        assert max_rel_diff(p, q) <= TOL[torch.float32]
