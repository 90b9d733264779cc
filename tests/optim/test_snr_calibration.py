"""AdamMini(calibrate=N): N steps while measuring SNR, then the SNR plan with block-mean v.

calibrate_state="adamw": AdamW for the window, SNR measured on its full v; calibrate_state="budget" (the
default): the window steps with the plan inside the state budget, SNR measured on a sample of v."""

from __future__ import annotations

import io
import json
import pathlib
import warnings

import pytest
import torch
from conftest import step_through_triton, text_batches

import blockopt
from blockopt.bench.metrics import optimizer_state_bytes
from blockopt.kernels import load_cpu_kernel
from blockopt.kernels.blocks import Geometry
from blockopt.models import build_model
from blockopt.optim.calibration import compress_to_blocks

N = 6  # calibration window of most tests
FIXTURES = pathlib.Path(__file__).parent.parent / "fixtures"


def _text_batches(n, batch=4, seq=32, seed=0):
    # real text that does not change with this package's code: the bench's default corpus (the
    # standard library's sources, in its fixed order), its first megabyte
    from blockopt.bench.data import _read_bytes, resolve_source

    text = _read_bytes(resolve_source(None, max_bytes=1 << 20))
    return text_batches(text, n, batch=batch, seq=seq, seed=seed)


def _model(n_layers=2, **kw):
    return build_model("llama-tiny", seed=0, n_layers=n_layers, d_model=32, n_heads=4, n_kv_heads=2, **kw)


#: the window that holds AdamW's state, on the official rules' structure (what calibrate= did before 0.2.0)
ADAMW_WINDOW = {"calibrate_state": "adamw", "rules": "official"}
MODES = {"adamw": ADAMW_WINDOW, "budget": {}}


def _make(model, **kw):
    return blockopt.AdamMini(model, lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1,
                             **{"calibrate": N, "calibrate_points": 2, **ADAMW_WINDOW, **kw})


def _make_budget(model, **kw):
    return blockopt.AdamMini(model, lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1,
                             **{"calibrate": N, "calibrate_points": 2, **kw})


def _train(model, opt, batches):
    for x, y in batches:
        model(x, y).backward()
        opt.step()
        opt.zero_grad()


def _routes(opt):
    return set(opt.routes.values())


def test_calibration_phase_is_adamw_bit_for_bit_and_the_switch_keeps_block_means():
    batches = _text_batches(N)
    model, ref_model = _model(), _model()
    opt = _make(model)
    plan = blockopt.partition(ref_model, warn=False)
    decay = [p for n, p in ref_model.named_parameters() if plan[n].weight_decay]
    rest = [p for n, p in ref_model.named_parameters() if not plan[n].weight_decay]
    ref = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                            lr=3e-3, betas=(0.9, 0.95), fused=True)
    for i, (x, y) in enumerate(batches, start=1):
        for m, o in ((model, opt), (ref_model, ref)):
            m(x, y).backward()
            if m is model and i == N:
                assert opt.calibration.phase == "calibrating" and _routes(opt) == {"adamw"}
            o.step()
            o.zero_grad()
        for a, b in zip(model.parameters(), ref_model.parameters()):
            assert torch.equal(a, b), i
    # switched after step N: every v is the mean of AdamW's v over the chosen block
    assert opt.calibration.phase == "done" and opt.calibration.steps_done == N
    assert opt.plan is opt.calibration.chosen and opt.calibration.meter.calibration.steps == [4, 6]
    named = dict(ref_model.named_parameters())
    changed = 0
    for name, p in model.named_parameters():
        if name not in opt.plan or opt.plan[name].name != name:
            continue
        entry = opt.plan[name]
        got = opt.state[p]["block_exp_avg_sq"]
        want = compress_to_blocks(ref.state[named[name]]["exp_avg_sq"], entry.shape, entry.geometry)
        assert got.numel() == entry.num_blocks and torch.equal(got, want), name
        changed += entry.kind != "element"
    assert changed >= 10


@pytest.mark.skipif(load_cpu_kernel() is None, reason="the fused CPU kernel is not available here")
def test_after_the_switch_the_fused_kernel_runs_and_matches_the_reference_loop():
    batches = _text_batches(N + 6)
    fast_model, ref_model = _model(), _model()
    fast, slow = _make(fast_model), _make(ref_model, foreach=False)
    _train(fast_model, fast, batches[:N + 1])
    assert "fused_cpu" in _routes(fast)  # the C++ kernel, with the SNR plan's rows and columns
    assert any(e.kind == "column" for e in fast.plan.entries)
    _train(fast_model, fast, batches[N + 1:])
    _train(ref_model, slow, batches)
    assert [e.geometry for e in fast.plan.entries] == [e.geometry for e in slow.plan.entries]
    for a, b in zip(fast_model.parameters(), ref_model.parameters()):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def _roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("mode", ["adamw", "budget"])
@pytest.mark.parametrize("at", [3, N, N + 3], ids=["during calibration", "at the switch", "after the switch"])
def test_resume_equals_an_uninterrupted_run_bit_for_bit(at, mode):
    batches = _text_batches(N + 6)
    model = _model()
    opt = _make(model, **MODES[mode])
    _train(model, opt, batches)
    model2 = _model()
    opt2 = _make(model2, **MODES[mode])
    _train(model2, opt2, batches[:at])
    ck = _roundtrip({"model": model2.state_dict(), "optim": opt2.state_dict()})
    saved = json.loads(ck["optim"]["param_groups"][0]["snr_calibration"])
    assert saved["phase"] == ("calibrating" if at < N else "done") and saved["steps_done"] == min(at, N)
    model3 = build_model("llama-tiny", seed=7, n_layers=2, d_model=32, n_heads=4, n_kv_heads=2)
    opt3 = _make(model3, **MODES[mode])
    model3.load_state_dict(ck["model"])
    opt3.load_state_dict(ck["optim"])
    assert opt3.calibration.phase == saved["phase"]
    _train(model3, opt3, batches[at:])
    for a, b in zip(model.parameters(), model3.parameters()):
        assert torch.equal(a, b)
    for p, q in zip(model.parameters(), model3.parameters()):
        for k in opt.state[p]:
            assert torch.equal(opt.state[p][k], opt3.state[q][k]), k
    assert opt3.plan == opt.plan
    assert opt3.calibration.meter.calibration.values == opt.calibration.meter.calibration.values


def test_saved_phase_checks_refuse_mismatches_and_change_nothing():
    batches = _text_batches(N + 1)
    model = _model()
    opt = _make(model)
    _train(model, opt, batches)
    sd = opt.state_dict()
    plain = blockopt.AdamMini(_model(), lr=3e-3)
    with pytest.raises(ValueError, match=r"saved by AdamMini\(calibrate=\.\.\.\)"):
        plain.load_state_dict(sd)
    other = _make(_model(), calibrate=N + 1)
    before = other.state_dict()
    with pytest.raises(ValueError, match="saved with calibrate window 6, this optimizer has 7"):
        other.load_state_dict(sd)
    fresh = _make(_model())
    plain_sd = blockopt.AdamMini(_model(), lr=3e-3).state_dict()
    with pytest.raises(ValueError, match="the state was saved without calibrate"):
        fresh.load_state_dict(plain_sd)
    # a state of the right phase but a corrupted tensor: refused, and the optimizer keeps its plan and phase
    bad = _roundtrip(sd)
    first = next(iter(bad["state"]))
    bad["state"][first]["block_exp_avg_sq"] = torch.zeros(3)
    with pytest.raises(ValueError, match="block values"):
        fresh.load_state_dict(bad)
    assert fresh.calibration.phase == "calibrating" and all(e.kind in ("element", "tensor")
                                                            for e in fresh.plan.entries)
    assert other.state_dict()["param_groups"][0]["snr_calibration"] == before["param_groups"][0]["snr_calibration"]
    # a saved SNR plan whose weight decay differs from this optimizer's is refused
    tampered = _roundtrip(sd)
    cal = json.loads(tampered["param_groups"][0]["snr_calibration"])
    cal["plan"]["entries"][1]["weight_decay"] = not cal["plan"]["entries"][1]["weight_decay"]
    tampered["param_groups"][0]["snr_calibration"] = json.dumps(cal)
    with pytest.raises(ValueError, match="shape or weight decay differs for"):
        fresh.load_state_dict(tampered)
    # a deep copy keeps the phase and the plan
    import copy

    twin = copy.deepcopy(opt)
    assert twin.calibration.phase == "done" and twin.plan == opt.plan


@pytest.mark.parametrize("kw, match", [
    ({"calibrate": 0}, r"Invalid calibrate: 0; expected a positive int"),
    ({"calibrate": -3}, r"Invalid calibrate: -3"),
    ({"calibrate": 2.5}, r"Invalid calibrate: 2.5"),
    ({"calibrate": True}, r"Invalid calibrate: True"),
    ({"calibrate": 4, "calibrate_points": 5}, r"Invalid calibrate_points: 5; expected an int in \[1, calibrate=4\]"),
    ({"calibrate": 4, "snr_cutoff": 0.0}, r"Invalid snr_cutoff: 0.0"),
])
def test_bad_calibration_arguments_are_clear_errors(kw, match):
    model = _model(1)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=match):
        blockopt.AdamMini(model, **kw)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_snr_plan_of_llama_tiny_halves_the_state_in_the_plan_and_in_the_tensors():
    """Real text, the bench's lr and betas, 40 steps of calibration at the default cutoff."""
    model = build_model("llama-tiny", seed=0)
    opt = blockopt.AdamMini(model, lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1, calibrate=40, **ADAMW_WINDOW)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _train(model, opt, _text_batches(41, batch=8, seq=64))
    assert not [w for w in caught if "above half" in str(w.message)]  # at or under 0.55x: no warning
    plan = opt.plan
    assert opt.calibration.phase == "done"
    ratio_plan = plan.state_bytes() / plan.adamw_state_bytes()
    adamw_bytes = 2 * 4 * sum(p.numel() for p in model.parameters())
    ratio_measured = optimizer_state_bytes(opt) / adamw_bytes
    assert ratio_plan <= 0.52 and ratio_measured <= 0.52, (ratio_plan, ratio_measured)
    assert sum(e.kind == "column" for e in plan.entries) >= 4  # o / MLP-down per input column
    text = str(plan)
    assert "snr" in text.splitlines()[0] and "SNR: row" in text and "SNR: column" in text


def test_a_state_saved_by_release_0_1_0_still_loads():
    """tests/fixtures/make_v0_1_0_state.py wrote these with release 0.1.0 (before SNR plans)."""
    import sys

    sys.path.insert(0, str(FIXTURES))
    try:
        from make_v0_1_0_state import make_model, train
    finally:
        sys.path.pop(0)
    saved = torch.load(FIXTURES / "adam_mini_state_v0_1_0.pt", weights_only=True)
    plan = blockopt.PartitionPlan.load(FIXTURES / "plan_v0_1_0.json")
    model = make_model()
    model.load_state_dict(saved["model"])
    with pytest.raises(ValueError, match="rules='official'"):  # the default plan is not 0.1.0's
        blockopt.AdamMini(make_model(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1).load_state_dict(
            saved["optimizer"])
    opt = blockopt.AdamMini(model, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, rules="official")
    assert opt.plan == plan
    opt.load_state_dict(saved["optimizer"])
    # and it goes on exactly as the uninterrupted 0.1.0 run would: 3 + 2 steps equal 5 steps from scratch
    train(model, opt, 2)
    ref_model = make_model()
    ref = blockopt.AdamMini(ref_model, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, rules="official")
    train(ref_model, ref, 3)
    train(ref_model, ref, 2)
    assert opt.state_dict()["state"][0]["step"].item() == 5.0
    named = dict(ref_model.named_parameters())
    for n, p in model.named_parameters():
        assert torch.allclose(p, named[n], rtol=0, atol=1e-6), n


def test_after_the_switch_the_triton_route_takes_the_snr_plan(monkeypatch):
    """On CPU tensors through the Triton interpreter (the route forced where the kernel supports the
    block geometry): after the switch rows, tensors and elements go to the Triton step, column blocks
    elsewhere (foreach on CUDA); the result equals the default route's."""
    pytest.importorskip("triton", reason="Triton is not installed (pip install 'blockopt[gpu]')")
    if torch.cuda.is_available():
        pytest.skip("forces the Triton route on CPU tensors (interpreter)")
    import copy

    from blockopt.kernels.adam_mini_triton import triton_supports

    model = _model(1)
    other = copy.deepcopy(model)
    via_triton, via_default = _make(model, calibrate=3), _make(other, calibrate=3)
    for x, y in _text_batches(6):
        for m, o in ((model, via_triton), (other, via_default)):
            m(x, y).backward()
            step_through_triton(o, monkeypatch) if o is via_triton else o.step()
            o.zero_grad()
    assert via_triton.calibration.phase == "done"
    kinds = {e.kind for e in via_triton.plan.entries}
    routes = _routes(via_triton)
    assert "triton" in routes and "column" in kinds
    # column blocks are not Triton's: on CUDA they take foreach, here the CPU route
    col = next(p for n, p in model.named_parameters() if n in via_triton.plan and via_triton.plan[n].kind == "column")
    assert not triton_supports(col, via_triton.state[col]["exp_avg"], Geometry(1, ((col.shape[1], 1),)))
    for p, q in zip(model.parameters(), other.parameters()):
        assert torch.allclose(p, q, rtol=1e-5, atol=1e-6)


def test_a_calibrated_plan_above_half_the_state_says_so_at_the_switch():
    """No candidate passes an SNR cutoff of 1e9: every tensor keeps one value per element after the switch,
    AdamW's state. The switch warns once, with the ratio; the run goes on."""
    model = _model()
    opt = _make(model, snr_cutoff=1e9)
    batches = _text_batches(N + 2)
    with pytest.warns(UserWarning, match=r"SNR plan keeps 1\.00x of AdamW's optimizer state, above half \(0\.55x\)"):
        _train(model, opt, batches[:N])
    assert opt.calibration.phase == "done"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _train(model, opt, batches[N:])  # once, at the switch only



# --- calibrate_state="budget": the window inside the state budget ------------------------------------
def _adamw_state_bytes(model):
    """What torch's AdamW really allocates for ``model`` (its state after one step)."""
    ref = torch.optim.AdamW(model.parameters())
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    ref.step()
    out = optimizer_state_bytes(ref)
    model.zero_grad(set_to_none=True)
    return out


def test_budget_window_keeps_the_state_within_the_budget_at_every_step():
    model = _model()
    adamw = _adamw_state_bytes(_model())
    opt = _make_budget(model)
    sample = opt.calibration.sample
    assert 0 < sample.nbytes <= 0.02 * opt.plan.adamw_state_bytes()
    ratios = []
    for i, (x, y) in enumerate(_text_batches(N + 3), start=1):
        model(x, y).backward()
        opt.step()
        opt.zero_grad()
        held = any("snr_sample_v" in st for st in opt.state.values())
        assert held == (i < N), i  # the sample lives in the state during the window, and is freed at the switch
        ratios.append(optimizer_state_bytes(opt) / adamw)
    assert max(ratios) <= 0.55, ratios
    assert ratios[0] > ratios[-1] - 0.05  # the sample is counted
    assert opt.plan.options["state_budget"] == 0.55 and opt.calibration.meter.calibration.source["method"] == "sampled"
    assert any(e.snr_choice for e in opt.plan.entries) and any("state budget 0.55" in e.rule for e in opt.plan.entries)


def test_budget_window_steps_with_the_window_plan_and_the_switch_carries_block_means():
    from blockopt.optim.calibration import carry_block_means
    from blockopt.partition.budget import state_ratio

    batches = _text_batches(N)
    model, ref_model = _model(), _model()
    opt = _make_budget(model)
    window = opt.calibration.window_plan
    assert opt.plan is window and 0.5 < state_ratio(window) <= 0.55 - 0.02 + 1e-3
    ref = blockopt.AdamMini(ref_model, lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1, plan=window)
    for x, y in batches:
        for m, o in ((model, opt), (ref_model, ref)):
            m(x, y).backward()
            o.step()
            o.zero_grad()
        for a, b in zip(model.parameters(), ref_model.parameters()):
            assert torch.equal(a, b)
    assert opt.calibration.phase == "done"
    named = dict(ref_model.named_parameters())
    changed = 0
    for name, p in model.named_parameters():
        old, new = window[name], opt.plan[name]
        want = carry_block_means(ref.state[named[name]]["block_exp_avg_sq"], old.shape, old.geometry, new.geometry)
        assert torch.equal(opt.state[p]["block_exp_avg_sq"], want), name
        changed += old.geometry != new.geometry
    assert changed >= 5


def test_carry_block_means_is_the_mean_of_the_old_values_over_each_new_block():
    from blockopt.kernels.blocks import block_index
    from blockopt.optim.calibration import carry_block_means

    shape = (6, 8)
    geos = [Geometry(0, ((6, 1),)), Geometry(1, ((8, 1),)), Geometry(0, ((4, 2), (2, 1))), Geometry(-1, ((48, 1),)),
            Geometry(-1, ((48, 48),))]
    for old in geos:
        v = torch.rand(old.num_blocks, dtype=torch.float32) + 0.1
        full = v.double()[block_index(shape, old)]
        for new in geos:
            ids = block_index(shape, new)
            want = torch.stack([full[ids == b].mean() for b in range(new.num_blocks)]).float()
            assert torch.allclose(carry_block_means(v, shape, old, new), want, rtol=1e-6, atol=0), (old, new)


def test_the_sample_holds_adamws_v_at_its_elements():
    model = _model()
    opt = _make_budget(model, calibrate=N + 4)
    grads = {n: [] for n, _ in model.named_parameters()}
    for x, y in _text_batches(N):
        model(x, y).backward()
        for n, p in model.named_parameters():
            grads[n].append(p.grad.detach().clone())
        opt.step()
        opt.zero_grad()
    checked = 0
    for n, p in model.named_parameters():
        st = opt.state[p]
        if "snr_sample_v" not in st:
            continue
        idx = st["snr_sample_index"].long()
        want = torch.zeros(idx.numel())
        for g in grads[n]:
            s = g.reshape(-1)[idx]
            want.mul_(0.95).addcmul_(s, s, value=0.05)
        assert torch.allclose(st["snr_sample_v"], want, rtol=1e-6, atol=0), n
        checked += 1
    assert checked >= 10


@pytest.mark.parametrize("kw, match", [
    ({"calibrate": 4, "state_budget": 0.51}, r"Invalid state_budget: 0.51; calibrating inside it needs"),
    ({"calibrate": 4, "calibrate_state": "full"}, r"Invalid calibrate_state: 'full'; allowed: 'budget'"),
    ({"calibrate": 4, "calibrate_state": "adamw", "state_budget": 0.6},
     r"Invalid state_budget with calibrate_state='adamw'"),
    ({"calibrate": 4, "state_budget": None}, r"Invalid state_budget=None with calibrate"),
    ({"rules": "nope"}, r"Invalid rules: 'nope'; allowed: 'builtin', 'blocks', 'official'"),
])
def test_bad_budget_calibration_arguments_are_clear_errors(kw, match):
    model = _model(1)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=match):
        blockopt.AdamMini(model, **kw)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_a_state_of_one_window_mode_refuses_the_other_and_changes_nothing():
    model = _model()
    opt = _make(model)
    _train(model, opt, _text_batches(3))
    saved = opt.state_dict()
    other = _make_budget(_model())
    before = other.state_dict()
    with pytest.raises(ValueError, match="saved with calibrate_state='adamw'.*build it with calibrate_state='adamw'"):
        other.load_state_dict(saved)
    assert other.state_dict()["param_groups"] == before["param_groups"] and not other.state
