"""Compact weights (AdamMini(weights=...)): bf16 parameters that keep fp32's updates."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import step_through_triton

import blockopt
from blockopt.kernels import load_cpu_kernel
from blockopt.kernels import weights as cw
from blockopt.models import build_model

FORMATS = list(cw.WEIGHT_FORMATS)
KW = {"lr": 3e-3, "betas": (0.9, 0.95), "weight_decay": 0.1}


def _model(name="llama-micro"):
    torch.manual_seed(0)
    return build_model(name)


def _wide(opt, p):
    return cw.widen(p.detach(), opt.state[p].get("weight_remainder"))


def _bf16_grads(model, gen):
    """Gradients that bf16 holds exactly, so an fp32 and a bf16 model can be fed the same ones."""
    return [torch.randn(p.shape, generator=gen).bfloat16() for p in model.parameters()]


def _feed(model, grads):
    for p, g in zip(model.parameters(), grads):
        p.grad = g.to(p.dtype)


def _same_steps(pairs, n, seed, step=lambda opt: opt.step()):
    """``n`` steps of each (model, optimizer) pair with the same bf16 gradients."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(n):
        grads = _bf16_grads(pairs[0][0], gen)
        for model, opt in pairs:
            _feed(model, grads)
            step(opt)


# --- the codec ---------------------------------------------------------------------------------------------
def test_the_int16_remainder_is_exact_and_the_others_unbiased():
    w = torch.randn(4096, 300) * torch.logspace(-6, 3, 300)
    for fmt, worst in (("bf16+int16", 0.0), ("bf16+int8", 2.0 ** -15), ("bf16-sr", 2.0 ** -7)):
        p = torch.empty(w.shape, dtype=torch.bfloat16)
        rem = cw.new_remainder(fmt, p)
        cw.narrow_(p, rem, w, 1, 1)
        back = cw.widen(p, rem)
        assert ((back - w).abs() / w.abs()).max().item() <= worst, fmt
        # the model reads the nearest bf16 (or a stochastic neighbour), never a truncation
        assert ((p.float() - w).abs() / w.abs()).max().item() <= 2.0 ** -7, fmt
    # small increments accumulate in every format; round-to-nearest bf16 would lose all of them
    for fmt in FORMATS:
        p = torch.ones(200_000, dtype=torch.bfloat16)
        rem = cw.new_remainder(fmt, p)
        for t in range(1, 51):
            cw.narrow_(p, rem, cw.widen(p, rem) + 1e-4, 3, t)
        assert abs(cw.widen(p, rem).double().mean().item() - 1.005) < 2e-5, fmt
    rn = torch.ones(10, dtype=torch.bfloat16)
    assert torch.equal((rn.float() + 1e-4).bfloat16(), rn)


# --- the optimizer -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", ["default", "foreach", "reference"])
def test_int16_remainder_steps_exactly_like_fp32_weights(impl):
    """bf16 + int16 keeps every bit: fed the same gradients, the widened weights equal an fp32 run's."""
    kw = {"default": {}, "foreach": {"fused": False}, "reference": {"foreach": False}}[impl]
    model = _model()
    ref = copy.deepcopy(model)
    opt = blockopt.AdamMini(model, weights="bf16+int16", **KW, **kw)
    ref_opt = blockopt.AdamMini(ref, **KW, **kw)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    _same_steps([(model, opt), (ref, ref_opt)], 8, seed=1)
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert torch.equal(_wide(opt, p), q), name
        assert torch.equal(opt.state[p]["exp_avg"], ref_opt.state[q]["exp_avg"]), name
    routes = set(opt.routes.values())
    assert routes == set(ref_opt.routes.values()) - {"adamw"} | ({"fused_cpu"} if "adamw" in ref_opt.routes.values()
                                                                  else set())
    if impl == "default" and load_cpu_kernel() is not None:
        assert routes == {"fused_cpu"}  # the C++ kernel steps the widened copies


def test_the_triton_route_steps_the_widened_copies(monkeypatch):
    pytest.importorskip("triton", reason="Triton is not installed (pip install 'blockopt[gpu]')")
    model = _model()
    ref = copy.deepcopy(model)
    opt = blockopt.AdamMini(model, weights="bf16+int16", rules="official", **KW)
    ref_opt = blockopt.AdamMini(ref, rules="official", **KW, foreach=True, fused=False)
    _same_steps([(model, opt), (ref, ref_opt)], 3, seed=2,
                step=lambda o: step_through_triton(o, monkeypatch) if o is opt else o.step())
    assert "triton" in set(opt.routes.values())
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert (_wide(opt, p) - q).abs().max().item() <= 1e-6 * q.abs().max().item() + 1e-12, name


def _drift(fmt: str | None, steps: int = 200) -> float:
    """Train llama-micro on a fixed batch stream with fp32 weights; feed the same gradients to a copy
    whose weights are stored in ``fmt`` (``"rn"``: plain bf16, round to nearest). Returns
    |w_compact - w_fp32| / |w_fp32 - w_0| over all weights (the error against the distance moved)."""
    model = _model()
    start = [p.detach().clone() for p in model.parameters()]
    low = copy.deepcopy(model)
    opt = blockopt.AdamMini(model, **KW)
    if fmt == "rn":
        low = low.to(torch.bfloat16)
        low_opt = blockopt.AdamMini(low, **KW, fused=False)
    else:
        low_opt = blockopt.AdamMini(low, weights=fmt, **KW)
    gen = torch.Generator().manual_seed(5)
    for _ in range(steps):
        x = torch.randint(0, 256, (4, 33), generator=gen)
        model(x[:, :-1], x[:, 1:]).backward()
        for p, q in zip(model.parameters(), low.parameters()):
            p.grad = p.grad.bfloat16().float()  # both get the same gradients: only the weights' storage differs
            q.grad = p.grad.to(q.dtype)
        opt.step()
        low_opt.step()
        opt.zero_grad()
        low_opt.zero_grad()
    err = moved = 0.0
    for p, q, s in zip(model.parameters(), low.parameters(), start):
        w = q.detach().float() if fmt == "rn" else _wide(low_opt, q)
        err += (w - p.detach()).double().pow(2).sum().item()
        moved += (p.detach() - s).double().pow(2).sum().item()
    return (err / moved) ** 0.5


def test_drift_from_fp32_weights_over_200_steps_is_bounded_for_each_format():
    """Measured (llama-micro, lr 3e-3, the same bf16 gradients): int16 0, int8 2.3e-4, sr 4.6e-2 of the
    distance moved; plain bf16 with round to nearest 9.1e-2. Bounds with margin; each beats plain bf16."""
    drift = {fmt: _drift(fmt) for fmt in (*FORMATS, "rn")}
    print("drift over 200 steps:", {k: f"{v:.2e}" for k, v in drift.items()})
    assert drift["bf16+int16"] == 0.0
    assert drift["bf16+int8"] < 1e-3
    assert drift["bf16-sr"] < 0.08
    assert drift["bf16-sr"] < 0.7 * drift["rn"] and drift["bf16+int8"] < drift["rn"] / 10


def test_resume_continues_exactly_with_the_remainder():
    model = _model()
    opt = blockopt.AdamMini(model, weights="bf16+int8", momentum_dtype="int8", **KW)
    gen = torch.Generator().manual_seed(3)
    grads = [_bf16_grads(model, gen) for _ in range(6)]
    for g in grads[:3]:
        _feed(model, g)
        opt.step()
    saved_model = copy.deepcopy(model.state_dict())
    saved = copy.deepcopy(opt.state_dict())
    for g in grads[3:]:
        _feed(model, g)
        opt.step()
    other = _model()
    other_opt = blockopt.AdamMini(other, weights="bf16+int8", momentum_dtype="int8", **KW)
    other.load_state_dict(saved_model)
    other_opt.load_state_dict(saved)
    for g in grads[3:]:
        _feed(other, g)
        other_opt.step()
    for (name, p), q in zip(model.named_parameters(), other.parameters()):
        assert torch.equal(p, q), name
        assert torch.equal(opt.state[p]["weight_remainder"], other_opt.state[q]["weight_remainder"]), name
        assert other_opt.state[q]["weight_remainder"].dtype == torch.int8


def test_step_in_backward_with_compact_weights_and_int8_momentum_equals_the_normal_step():
    model = _model()
    other = copy.deepcopy(model)
    kw = {**KW, "weights": "bf16-sr", "momentum_dtype": "int8"}
    opt, other_opt = blockopt.AdamMini(model, **kw), blockopt.AdamMini(other, **kw)
    handle = blockopt.step_in_backward(opt)
    gen = torch.Generator().manual_seed(4)
    for _ in range(4):
        x = torch.randint(0, 256, (2, 17), generator=gen)
        for m, o in ((model, opt), (other, other_opt)):
            m(x[:, :-1], x[:, 1:]).backward()
            o.step()
            o.zero_grad()
    handle.remove()
    for (name, p), q in zip(model.named_parameters(), other.parameters()):
        assert p.dtype == torch.bfloat16 and torch.equal(p, q), name


def test_the_module_runs_in_bf16_and_the_state_holds_the_remainder_bytes():
    model = _model()
    opt = blockopt.AdamMini(model, weights="bf16+int8", **KW)
    assert {b.dtype for b in model.buffers() if b.is_floating_point()} <= {torch.bfloat16}
    x = torch.randint(0, 256, (2, 17))
    assert model(x[:, :-1]).dtype == torch.bfloat16  # the logits: the forward ran in bf16
    n = sum(p.numel() for p in model.parameters())
    assert sum(opt.state[p]["weight_remainder"].numel() for p in model.parameters()) == n
    assert cw.weight_bytes("bf16+int8") == 3 and cw.weight_bytes("bf16-sr") == 2 and cw.weight_bytes(None) == 4


# --- bad input ---------------------------------------------------------------------------------------------
def test_fp32_tensors_not_handed_over_are_refused_and_nothing_changes():
    model = _model()
    plan = blockopt.partition(model)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"weights='bf16-sr' for parameter 'embed.weight'.*fp32 tensor passed.*"
                                         r"AdamMini\(model, weights=\.\.\.\)"):
        blockopt.AdamMini(model.named_parameters(), plan=plan, weights="bf16-sr")
    assert all(p.dtype == torch.float32 and torch.equal(p, b) for p, b in zip(model.parameters(), before))
    # bf16 tensors passed by the user are fine: their remainder starts at zero
    low = _model().to(torch.bfloat16)
    opt = blockopt.AdamMini(low.named_parameters(), plan=plan, weights="bf16+int16")
    assert all(not opt.state[p]["weight_remainder"].any() for p in low.parameters())


def test_an_unknown_format_is_refused_and_nothing_changes():
    model = _model()
    with pytest.raises(ValueError, match=r"Invalid weights: 'bf16'; allowed: None .*'bf16-sr', 'bf16\+int8', "
                                         r"'bf16\+int16'"):
        blockopt.AdamMini(model, weights="bf16")
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_print_plan_counts_the_bytes_of_compact_weights_and_momentum(tmp_path):
    model = _model("llama-tiny")
    opt = blockopt.AdamMini(model, weights="bf16-sr", momentum_dtype="int8")
    text = str(opt.plan)
    state = opt.plan.state_bytes(momentum_dtype="int8")
    n = opt.plan.num_params
    assert f"weights bf16-sr (2 B) + state: {2 + state / n:.2f} bytes per parameter" in text
    assert "int8 momentum: state" in text
    assert "bytes per parameter" not in str(blockopt.AdamMini(_model("llama-tiny")).plan)
    opt.plan.save(tmp_path / "plan.json")  # the options travel with a saved plan
    assert blockopt.PartitionPlan.load(tmp_path / "plan.json").options["weights"] == "bf16-sr"


@pytest.mark.parametrize("kind", ["element", "row"])
def test_large_tensors_are_widened_in_runs_of_rows_with_the_same_result(monkeypatch, kind):
    """A tensor whose blocks lie within rows is stepped in runs of rows (small fp32 copies); the
    result equals the whole tensor's, bit for bit (fp32 momentum), and the step counter moves once."""
    from blockopt.kernels import dispatch

    model = _model()
    whole_model = copy.deepcopy(model)
    kw = {**KW, "weights": "bf16+int16", "overrides": {r"embed\.weight": kind}}
    opt, whole = blockopt.AdamMini(model, **kw), blockopt.AdamMini(whole_model, **kw)
    emb = model.embed.weight
    assert dispatch._row_runs(emb, opt.param_entries[emb].geometry) is None  # 16,384 elements: one run
    gen = torch.Generator().manual_seed(6)
    for _ in range(3):
        grads = _bf16_grads(model, gen)
        _feed(model, grads)
        _feed(whole_model, grads)
        with monkeypatch.context() as mp:
            mp.setattr(dispatch, "WIDE_CHUNK", 1024)  # 16 rows of 64
            assert len(dispatch._row_runs(emb, opt.param_entries[emb].geometry)) == 16
            opt.step()
        whole.step()
    for (name, p), q in zip(model.named_parameters(), whole_model.parameters()):
        assert torch.equal(_wide(opt, p), _wide(whole, q)), name
        assert torch.equal(opt.state[p]["exp_avg"], whole.state[q]["exp_avg"]), name
        assert opt.state[p]["step"].item() == 3, name


def test_int8_momentum_of_a_large_per_element_tensor_runs_in_runs_of_rows(monkeypatch):
    from blockopt.kernels import dispatch

    model = _model()
    ref = copy.deepcopy(model)
    opt = blockopt.AdamMini(model, **KW, weights="bf16+int16", momentum_dtype="int8",
                            overrides={r"embed\.weight": "element"})
    ref_opt = blockopt.AdamMini(ref, **KW, momentum_dtype="int8", overrides={r"embed\.weight": "element"})
    monkeypatch.setattr(dispatch, "WIDE_CHUNK", 1024)
    _same_steps([(model, opt), (ref, ref_opt)], 3, seed=7)
    a, b = _wide(opt, model.embed.weight), ref.embed.weight.detach()
    assert opt.state[model.embed.weight]["exp_avg"].dtype == torch.int8
    # other random bits for the momentum's rounding (per run of rows), the same update within its noise
    assert (a - b).abs().max().item() <= 0.1 * (b - _model().embed.weight).abs().max().item()


@pytest.mark.skipif(load_cpu_kernel() is None, reason="the C++ kernel is not built here")
@pytest.mark.parametrize("fmt", FORMATS)
def test_the_kernels_narrowing_equals_the_torch_ops_bit_for_bit(monkeypatch, fmt):
    w = torch.randn(3, 70_001) * torch.logspace(-5, 2, 70_001)
    got_p = torch.empty(w.shape, dtype=torch.bfloat16)
    got_r = cw.new_remainder(fmt, got_p)
    cw.narrow_(got_p, got_r, w, 11, 5, offset=7)
    assert cw._kernel() is not None
    monkeypatch.setattr(cw, "_kernel", lambda: None)  # the torch ops
    want_p = torch.empty(w.shape, dtype=torch.bfloat16)
    want_r = cw.new_remainder(fmt, want_p)
    cw.narrow_(want_p, want_r, w, 11, 5, offset=7)
    assert torch.equal(got_p.view(torch.int16), want_p.view(torch.int16))
    assert got_r is None or torch.equal(got_r, want_r)
