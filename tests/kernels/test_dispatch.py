"""The one dispatcher (blockopt.kernels.dispatch): every route, observed through the public way
(the functional form's return value and ``AdamMini.routes``), equals the reference loop; the Triton
route falls back safely."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from conftest import TOL, max_rel_diff
from torch import nn

import blockopt
from blockopt.kernels import Geometry, adam_mini_reference, dispatch, load_cpu_kernel

SHAPES = [((6, 8), Geometry(0, ((6, 1),))), ((8, 4), Geometry(0, ((8, 4),))), ((5,), Geometry(-1, ((5, 1),))),
          ((4, 6), Geometry(1, ((6, 1),))), ((3, 4, 2), Geometry(-1, ((24, 2),)))]
HYPER = {"lr": 1e-2, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.1, "maximize": False}


def _state(seed=0):
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=g) for s, _ in SHAPES]
    return (params, [torch.zeros_like(p) for p in params], [torch.zeros(geo.num_blocks) for _, geo in SHAPES],
            [torch.tensor(0.0) for _ in params])


def _grads(n=4):
    g = torch.Generator().manual_seed(7)
    return [[torch.randn(s, generator=g) for s, _ in SHAPES] for _ in range(n)]


def _steps(route, state, grads):
    params, m, v, t = state
    geos, decay = [geo for _, geo in SHAPES], [True, True, False, True, True]
    ran = None
    for gs in grads:
        if route == "plain reference":
            adam_mini_reference(params, gs, m, v, t, geos, decay, **HYPER)
        else:
            ran = dispatch.adam_mini(params, gs, m, v, t, geos, decay, route=route, **HYPER)
    return ran


@pytest.mark.parametrize("route", ["reference", "foreach", "fused_cpu", "triton"])
def test_each_route_reports_itself_and_equals_the_reference_loop(route):
    if route == "fused_cpu" and load_cpu_kernel() is None:
        pytest.skip("the fused CPU kernel is not built")
    if route == "triton" and not dispatch.triton_enabled():
        pytest.skip("Triton is not installed or is disabled")
    shapes = SHAPES if route != "triton" else SHAPES[:3] + SHAPES[4:]  # Triton has no column blocks
    grads = _grads()
    ref, fast = _state(), _state()
    if route == "triton":
        keep = [i for i, s in enumerate(SHAPES) if s in shapes]
        ref, fast = ([[x[i] for i in keep] for x in st] for st in (ref, fast))
        grads = [[gs[i] for i in keep] for gs in grads]
        geos = [SHAPES[i][1] for i in keep]
        for gs in grads:
            adam_mini_reference(*ref[:1], gs, *ref[1:], geos, [True] * len(keep), **HYPER)
            ran = dispatch.adam_mini(*fast[:1], gs, *fast[1:], geos, [True] * len(keep), route="triton", **HYPER)
    else:
        _steps("plain reference", ref, grads)
        ran = _steps(route, fast, grads)
    assert ran == [route] * len(ran)
    for a, b in zip(fast[0], ref[0]):
        assert max_rel_diff(a, b) <= TOL[torch.float32]


def test_per_element_fp32_tensors_take_torchs_fused_adamw_bit_for_bit():
    p = torch.randn(16, generator=torch.Generator().manual_seed(0))
    q = p.clone().requires_grad_()
    opt = torch.optim.AdamW([q], lr=1e-2, weight_decay=0.1, fused=True)
    m, v, t = torch.zeros(16), torch.zeros(16), torch.tensor(0.0)
    for gs in _grads(3):
        g = gs[0].reshape(-1)[:16]
        ran = dispatch.adam_mini([p], [g], [m], [v], [t], [Geometry(-1, ((16, 1),))], [True], **HYPER)
        q.grad = g.clone()
        opt.step()
    assert ran == ["adamw"] and torch.equal(p, q.detach())


def test_the_optimizer_reports_the_routes_it_took():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    runs = {}
    for label, kw in (("reference", {"foreach": False}), ("foreach", {"fused": False}), ("default", {})):
        m = copy.deepcopy(model)
        opt = blockopt.AdamMini(m, rules="official", lr=1e-2, **kw)
        m(torch.randn(3, 8)).sum().backward()
        opt.step()
        runs[label] = dict(opt.routes)
    assert set(runs["reference"].values()) == {"reference"}
    assert set(runs["foreach"].values()) == {"foreach"}
    # with the C++ kernel the per-element biases join its launch; without it they take torch's fused AdamW
    kernel = load_cpu_kernel() is not None
    want_weight, want_bias = ("fused_cpu", "fused_cpu") if kernel else ("foreach", "adamw")
    assert runs["default"] == {"0.weight": want_weight, "0.bias": want_bias, "2.weight": want_weight,
                               "2.bias": want_bias}
    # a group of per-element tensors only keeps torch's fused AdamW (bit for bit, as tested above)
    m = copy.deepcopy(model)
    opt = blockopt.AdamMini(m, rules="official", lr=1e-2, overrides={r".*": "element"})
    m(torch.randn(3, 8)).sum().backward()
    opt.step()
    assert set(opt.routes.values()) == {"adamw"}


def test_a_failing_triton_launch_warns_once_and_falls_back_with_nothing_changed(monkeypatch):
    if not dispatch.triton_available():
        pytest.skip("Triton is not installed")

    def broken(*args, **kwargs):
        raise RuntimeError("boom: no compiler for this GPU")

    monkeypatch.setattr(dispatch, "adam_mini_triton", broken)
    monkeypatch.setitem(dispatch._triton_state, "error", None)
    monkeypatch.setitem(dispatch._triton_state, "probed", set())
    shapes = [SHAPES[0], SHAPES[2]]
    g = torch.Generator().manual_seed(3)
    base = [torch.randn(s, generator=g) for s, _ in shapes]
    grads = [torch.randn(s, generator=g) for s, _ in shapes]
    geos = [geo for _, geo in shapes]

    def fresh():
        return ([p.clone() for p in base], [torch.zeros(s) for s, _ in shapes],
                [torch.zeros(geo.num_blocks) for geo in geos], [torch.tensor(0.0) for _ in shapes])

    a, b = fresh(), fresh()
    with pytest.warns(RuntimeWarning, match=r"boom.*BLOCKOPT_DISABLE_TRITON=1"):
        ran = dispatch.adam_mini(a[0], grads, *a[1:], geos, [True, True], route="triton", **HYPER)
    dispatch.adam_mini(b[0], grads, *b[1:], geos, [True, True], route="foreach", **HYPER)
    assert ran == ["foreach", "foreach"]
    for x, y in zip(a, b):  # params, m, v and the step counters: one foreach step, nothing more
        for s, t in zip(x, y):
            assert torch.equal(s, t)
    assert not dispatch.triton_enabled()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once: the second step does not warn again
        dispatch.adam_mini(a[0], grads, *a[1:], geos, [True, True], route="triton", **HYPER)


def test_disable_triton_switch(monkeypatch):
    monkeypatch.setenv("BLOCKOPT_DISABLE_TRITON", "1")
    assert not dispatch.triton_enabled()
    with pytest.raises(RuntimeError, match="capturable=True needs the Triton step"):
        blockopt.AdamMini(nn.Linear(2, 2), capturable=True)


def test_bad_route_is_named():
    with pytest.raises(ValueError, match="Invalid route: 'gpu'; allowed: reference, foreach"):
        dispatch.adam_mini([torch.zeros(2)], [torch.zeros(2)], [torch.zeros(2)], [torch.zeros(2)],
                           [torch.tensor(0.0)], [Geometry(-1, ((2, 1),))], [True], route="gpu", **HYPER)
