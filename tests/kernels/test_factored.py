"""Factored second moments (a matrix's row and column EMAs): the reference against its written-out
definition, and the foreach step and the C++ kernel against the reference."""

from __future__ import annotations

import copy
import os
import shutil

import pytest
import torch
from conftest import TOL, max_rel_diff

import blockopt
from blockopt.bench.models import build_model
from blockopt.kernels.adam_mini import adam_mini_foreach, adam_mini_reference
from blockopt.kernels.blocks import FACTORED, Geometry, block_views, check_geometry, factored_geometry

needs_compiler = pytest.mark.skipif(
    (shutil.which("c++") is None and shutil.which("g++") is None)
    or os.environ.get("BLOCKOPT_DISABLE_CPU_KERNEL", "") not in ("", "0"),
    reason="no C++ compiler, or BLOCKOPT_DISABLE_CPU_KERNEL is set: the fused CPU kernel is not built")

HP = {"lr": 1e-2, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8, "weight_decay": 0.1, "maximize": False}


def _written_out(w, grads, hp):
    """The definition, in float64 with plain Python loops over rows and columns."""
    rows, cols = w.shape
    w = w.double().clone()
    m = torch.zeros_like(w)
    r_ema, c_ema = [0.0] * rows, [0.0] * cols
    for t, g in enumerate(grads, start=1):
        g = g.double()
        c_mean = sum(c_ema) / cols
        shape = [(c / c_mean) ** 0.5 if c_mean > 0 else 1.0 for c in c_ema]  # before this step's update
        w *= 1 - hp["lr"] * hp["weight_decay"]
        m = hp["beta1"] * m + (1 - hp["beta1"]) * g
        for i in range(rows):
            r_ema[i] = hp["beta2"] * r_ema[i] + (1 - hp["beta2"]) * float((g[i] ** 2).mean())
        for i in range(rows):
            for j in range(cols):
                denom = (r_ema[i] / (1 - hp["beta2"] ** t)) ** 0.5 * shape[j] + hp["eps"]
                w[i, j] -= hp["lr"] / (1 - hp["beta1"] ** t) * m[i, j] / denom
        for j in range(cols):
            c_ema[j] = hp["beta2"] * c_ema[j] + (1 - hp["beta2"]) * float((g[:, j] ** 2).mean())
    return w, m, torch.tensor(r_ema + c_ema, dtype=torch.float64)


def _run(step, w, grads, geometry, hp):
    w = w.clone()
    m, v, t = torch.zeros_like(w), torch.zeros(geometry.num_blocks, dtype=w.dtype), torch.zeros(())
    for g in grads:
        step([w], [g], [m], [v], [t], [geometry], [True], **hp)
    return w, m, v


def _case(rows=5, cols=7, steps=4, dtype=torch.float64):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(rows, cols, generator=gen, dtype=dtype)
    # rows and columns of different scales, as in a real layer
    scale = torch.rand(rows, 1, generator=gen, dtype=dtype) * torch.rand(1, cols, generator=gen, dtype=dtype) + 0.1
    return w, [torch.randn(rows, cols, generator=gen, dtype=dtype) * scale for _ in range(steps)]


def test_reference_is_the_written_out_definition():
    w, grads = _case()
    got_w, got_m, got_v = _run(adam_mini_reference, w, grads, factored_geometry(w.shape), HP)
    want_w, want_m, want_v = _written_out(w, grads, HP)
    assert max_rel_diff(got_w, want_w) <= TOL[torch.float64]
    assert max_rel_diff(got_m, want_m) <= TOL[torch.float64]
    assert max_rel_diff(got_v, want_v) <= TOL[torch.float64]


def test_first_step_is_row_blocks_and_later_steps_are_not():
    """Before any column EMA exists the column shape is 1: step 1 is one block per row."""
    w, grads = _case(steps=2)
    fact = _run(adam_mini_reference, w, grads[:1], factored_geometry(w.shape), HP)[0]
    rows = _run(adam_mini_reference, w, grads[:1], Geometry(0, ((w.shape[0], 1),)), HP)[0]
    assert max_rel_diff(fact, rows) <= TOL[torch.float64]
    fact2 = _run(adam_mini_reference, w, grads, factored_geometry(w.shape), HP)[0]
    rows2 = _run(adam_mini_reference, w, grads, Geometry(0, ((w.shape[0], 1),)), HP)[0]
    assert max_rel_diff(fact2, rows2) > 1e-4


@pytest.mark.parametrize("maximize", [False, True])
def test_foreach_equals_reference(maximize):
    w, grads = _case(rows=33, cols=20, steps=6, dtype=torch.float32)
    hp = {**HP, "maximize": maximize}
    geometry = factored_geometry(w.shape)
    a = _run(adam_mini_foreach, w, grads, geometry, hp)
    b = _run(adam_mini_reference, w, grads, geometry, hp)
    for x, y in zip(a, b):
        assert max_rel_diff(x, y) <= TOL[torch.float32]


def test_all_zero_gradients_leave_the_matrix_to_weight_decay_alone():
    w, _ = _case(dtype=torch.float32)
    zeros = [torch.zeros_like(w)] * 3
    for step in (adam_mini_foreach, adam_mini_reference):
        got, _m, v = _run(step, w, zeros, factored_geometry(w.shape), HP)
        assert torch.isfinite(got).all() and not v.any()
        assert max_rel_diff(got, w * (1 - HP["lr"] * HP["weight_decay"]) ** 3) <= TOL[torch.float32]


def test_factored_geometry_is_checked_and_has_no_blocks():
    assert factored_geometry((4, 6)) == Geometry(FACTORED, ((4, 1), (6, 1)))
    assert factored_geometry((4, 6)).num_blocks == 10
    with pytest.raises(ValueError, match=r"a factored second moment needs a 2-D tensor, got shape \[4, 6, 2\]"):
        factored_geometry((4, 6, 2))
    with pytest.raises(ValueError, match=r"geometry axis 3 \(factored\) needs a 2-D tensor and the segments"):
        check_geometry((4, 6), Geometry(FACTORED, ((6, 1), (4, 1))))
    with pytest.raises(ValueError, match=r"a factored second moment has no blocks: block_views needs a block "
                                         r"geometry .*rules='blocks'"):
        block_views(torch.zeros(4, 6), factored_geometry((4, 6)))


def _random_steps(pairs, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    first = pairs[0][0]
    for _ in range(steps):
        grads = [torch.randn(p.shape, generator=g) for p in first.parameters()]
        for model, opt in pairs:
            for p, grad in zip(model.parameters(), grads):
                p.grad = grad.clone()
            opt.step()


@needs_compiler
@pytest.mark.parametrize("momentum_dtype", [None, torch.bfloat16])
@pytest.mark.parametrize("style", ["llama", "gpt2"])
def test_fused_cpu_kernel_equals_reference_on_the_default_plan(momentum_dtype, style):
    model = build_model(f"{style}-tiny", vocab_size=96, n_layers=2, d_model=64)
    ref = copy.deepcopy(model)
    kw = {"lr": 1e-2, "betas": (0.9, 0.95), "weight_decay": 0.1, "momentum_dtype": momentum_dtype}
    fast = blockopt.AdamMini(model, fused=True, **kw)
    slow = blockopt.AdamMini(ref, foreach=False, **kw)
    factored = [e.name for e in fast.plan.entries if e.kind == "factored"]
    assert len(factored) >= 6
    _random_steps([(model, fast), (ref, slow)], 12)
    assert {fast.routes[n] for n in factored} == {"fused_cpu"}  # no silent fallback
    assert set(slow.routes.values()) == {"reference"}
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert max_rel_diff(p, q) <= TOL[torch.float32], name
        assert max_rel_diff(fast.state[p]["block_exp_avg_sq"], slow.state[q]["block_exp_avg_sq"]) <= TOL[torch.float32]
        if momentum_dtype == torch.bfloat16:
            assert torch.equal(fast.state[p]["exp_avg"], slow.state[q]["exp_avg"]), name


@needs_compiler
@pytest.mark.parametrize("style", ["llama", "gpt2"])
def test_fused_cpu_kernel_equals_reference_with_int8_momentum_step_by_step(style):
    # An int8 code whose value sits at a rounding boundary can come out one unit apart (the kernel and
    # the reference round sqrt in a different order), and a flipped code then grows over later steps;
    # so each step starts both from the reference's state, and one step's results are compared.
    model = build_model(f"{style}-tiny", vocab_size=96, n_layers=2, d_model=64)
    ref = copy.deepcopy(model)
    kw = {"lr": 1e-2, "betas": (0.9, 0.95), "weight_decay": 0.1, "momentum_dtype": "int8"}
    fast = blockopt.AdamMini(model, fused=True, **kw)
    slow = blockopt.AdamMini(ref, foreach=False, **kw)
    factored = [e.name for e in fast.plan.entries if e.kind == "factored"]
    flipped = 0
    for _ in range(12):
        _random_steps([(model, fast), (ref, slow)], 1, seed=_)
        assert {fast.routes[n] for n in factored} == {"fused_cpu"}
        for (name, p), q in zip(model.named_parameters(), ref.parameters()):
            a, b = fast.state[p]["exp_avg"], slow.state[q]["exp_avg"]
            codes = (a.int() - b.int()).abs()
            assert codes.max() <= 1 and int((codes > 0).sum()) <= 2, name
            flipped += int((codes > 0).sum())
            assert max_rel_diff(p, q) <= 1e-3 if codes.any() else max_rel_diff(p, q) <= TOL[torch.float32], name
            assert max_rel_diff(fast.state[p]["block_exp_avg_sq"], slow.state[q]["block_exp_avg_sq"]) <= 1e-5, name
        with torch.no_grad():
            for p, q in zip(model.parameters(), ref.parameters()):
                p.copy_(q)
        fast.load_state_dict(slow.state_dict())
        for group in fast.param_groups:  # as torch.optim does, the loaded groups carry the saved route flags
            group.update(fused=True, foreach=None)
    assert flipped <= 4


@needs_compiler
def test_fused_cpu_factored_step_does_not_depend_on_the_thread_split():
    base = build_model("llama-tiny", vocab_size=96, n_layers=2, d_model=64)
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            model = copy.deepcopy(base)
            opt = blockopt.AdamMini(model, lr=1e-2, fused=True)
            _random_steps([(model, opt)], 3)
            results.append([p.detach().clone() for p in model.parameters()])
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(a, b)


@needs_compiler
@pytest.mark.parametrize("momentum_dtype", [None, torch.bfloat16])
def test_a_large_factored_matrix_is_split_into_row_items_and_still_equals_the_reference(momentum_dtype):
    from blockopt.kernels.adam_mini_cpu import FACTORED_CHUNK_ELEMENTS, step_table

    rows, cols = 2 * FACTORED_CHUNK_ELEMENTS // 256 + 37, 256  # three items, the last 37 rows long
    table = step_table([(rows, cols)], [factored_geometry((rows, cols))])
    assert table[:, 3].tolist() == [-1] * 3 and table[:, 2].tolist() == [2048, 2048, 37]
    assert table[:, 1].tolist() == [0, 2048 * cols, 4096 * cols] and table[:, 5].tolist() == table[:, 1].tolist()
    model = torch.nn.Linear(cols, rows, bias=False)
    ref = copy.deepcopy(model)
    kw = {"lr": 1e-2, "weight_decay": 0.1, "momentum_dtype": momentum_dtype, "overrides": {"weight": "factored"}}
    fast = blockopt.AdamMini(model, fused=True, **kw)
    slow = blockopt.AdamMini(ref, foreach=False, **kw)
    _random_steps([(model, fast), (ref, slow)], 4)
    assert fast.routes["weight"] == "fused_cpu"
    assert max_rel_diff(model.weight, ref.weight) <= TOL[torch.float32]
    # the column EMAs sum every item's rows (a lost item would leave its rows' squares out)
    v, w = fast.state[model.weight]["block_exp_avg_sq"], slow.state[ref.weight]["block_exp_avg_sq"]
    assert max_rel_diff(v[rows:], w[rows:]) <= TOL[torch.float32]
    assert max_rel_diff(v[:rows], w[:rows]) <= TOL[torch.float32]


def _fused_equals_reference(rows, cols, kind, spread, steps, maximize=False):
    """A [rows, cols] weight with `kind` blocks stepped by the C++ kernel and by the reference, with
    gradients randn * spread: equal parameters and second moments within TOL, equal momentum."""
    torch.manual_seed(0)
    model = torch.nn.Linear(cols, rows, bias=False)
    ref = copy.deepcopy(model)
    kw = {"lr": 1e-2, "weight_decay": 0.1, "maximize": maximize, "overrides": {"weight": kind}}
    fast = blockopt.AdamMini(model, fused=True, **kw)
    slow = blockopt.AdamMini(ref, foreach=False, **kw)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        grad = torch.randn(rows, cols, generator=g) * spread
        model.weight.grad, ref.weight.grad = grad.clone(), grad.clone()
        fast.step()
        slow.step()
    assert fast.routes["weight"] == "fused_cpu"
    assert max_rel_diff(model.weight, ref.weight) <= TOL[torch.float32]
    v, w = fast.state[model.weight]["block_exp_avg_sq"], slow.state[ref.weight]["block_exp_avg_sq"]
    assert max_rel_diff(v, w) <= TOL[torch.float32]
    assert torch.equal(fast.state[model.weight]["exp_avg"], slow.state[ref.weight]["exp_avg"])


@needs_compiler
@pytest.mark.parametrize("cols", [96, 1100])  # narrow rows go one at a time; wide ones two halves together
@pytest.mark.parametrize("scale", [1.0, 1e-3, 1e-5, 1e-7])  # eps / sqrt(v): ~1e-8, 1e-5, 1e-3, 0.1 (every form)
def test_fused_cpu_factored_step_equals_the_reference_at_every_gradient_scale(cols, scale):
    # the kernel writes step / (a * shape + eps) as ra * inv, a first- or second-order series, or a division,
    # by the size of eps / a; 70 rows: two column tiles of 32 rows and a rest of 6
    col_spread = torch.rand(1, cols, generator=torch.Generator().manual_seed(2)) * 3 + 0.25  # shapes away from 1
    _fused_equals_reference(70, cols, "factored", col_spread * scale, steps=4)


@needs_compiler
@pytest.mark.filterwarnings("ignore:AdamMini\\(model\\).*above the default state budget")  # a 1-row matrix is over it
@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("rows", [1, 2, 3, 33, 67])
@pytest.mark.parametrize("kind,cols", [("factored", 1100), ("factored", 96), ("row", 96)])
def test_fused_cpu_paired_halves_equal_the_reference_for_any_row_count(kind, cols, rows, maximize):
    # fp32 row blocks and wide factored rows step an item's two halves together: odd, single and
    # two-row items leave one half empty or one row longer; 33 and 67 rows cross the 32-row column tile
    row_spread = torch.rand(rows, 1, generator=torch.Generator().manual_seed(2)) * 3 + 0.25  # each row its own step
    _fused_equals_reference(rows, cols, kind, row_spread * 1e-3, steps=3, maximize=maximize)
