"""The Triton step against the reference loop (interpreter on CPU, real kernels on a GPU)."""

from __future__ import annotations

import pytest
import torch
from conftest import TOL, max_rel_diff, step_through_triton

import blockopt
from blockopt.bench.models import build_model
from blockopt.kernels import adam_mini_reference

triton = pytest.importorskip("triton", reason="Triton is not installed (pip install 'blockopt[gpu]')")
from blockopt.kernels.adam_mini_triton import adam_mini_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _setup(dtype, style="gpt2"):
    model = build_model(f"{style}-tiny", vocab_size=16, n_layers=1, d_model=16, n_heads=2, max_seq_len=8, d_ff=16)
    plan = blockopt.partition(model)
    names = [n for n, _ in model.named_parameters()]

    def copy_state():
        params = [p.detach().to(DEVICE, dtype, copy=True) for p in model.parameters()]
        m = [torch.zeros(p.shape, device=DEVICE) for p in params]
        v = [torch.zeros(plan[n].num_blocks, device=DEVICE) for n in names]
        return params, m, v, [torch.tensor(0.0, device=DEVICE) for _ in params]

    return model, plan, names, copy_state


def _run(step_fn, state, grads_list, geoms, decay, **kw):
    params, m, v, steps = state
    for grads in grads_list:
        step_fn(params, [g.to(p.dtype) for g, p in zip(grads, params)], m, v, steps, geoms, decay, **kw)
    return params, m, v


@pytest.mark.parametrize("style", ["gpt2", "llama"])
@pytest.mark.parametrize("capturable", [False, True])
def test_triton_equals_reference_fp32_after_20_steps(style, capturable):
    model, plan, names, fresh = _setup(torch.float32, style)
    geoms = [plan[n].geometry for n in names]
    decay = [plan[n].weight_decay for n in names]
    assert {"head", "row", "tensor"} <= {plan[n].kind for n in names}
    g = torch.Generator().manual_seed(0)
    grads = [[torch.randn(p.shape, generator=g).to(DEVICE) for p in model.parameters()] for _ in range(20)]
    kw = {"lr": 1e-2, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.1, "maximize": False}
    fast = _run(adam_mini_triton, fresh(), grads, geoms, decay, capturable=capturable, **kw)
    ref = _run(adam_mini_reference, fresh(), grads, geoms, decay, **kw)
    for name, a, b in zip(names, fast[0], ref[0]):
        assert max_rel_diff(a, b) <= TOL[torch.float32], name
    for a, b in zip(fast[2], ref[2]):
        assert max_rel_diff(a, b) <= TOL[torch.float32]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_low_precision_params_with_fp32_state(dtype):
    model, plan, names, fresh = _setup(dtype)
    geoms = [plan[n].geometry for n in names]
    decay = [plan[n].weight_decay for n in names]
    g = torch.Generator().manual_seed(1)
    grads = [[torch.randn(p.shape, generator=g).to(DEVICE) for p in model.parameters()] for _ in range(5)]
    kw = {"lr": 1e-3, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8, "weight_decay": 0.0, "maximize": True}
    fast = _run(adam_mini_triton, fresh(), grads, geoms, decay, **kw)
    ref = _run(adam_mini_reference, fresh(), grads, geoms, decay, **kw)
    for name, a, b, m in zip(names, fast[0], ref[0], fast[1]):
        assert a.dtype == dtype and m.dtype == torch.float32
        # torch.testing's default tolerance for low-precision dtypes, as torch's own fused-vs-foreach tests use
        torch.testing.assert_close(a, b, msg=lambda msg, name=name: f"{name}: {msg}")


def test_triton_bf16_momentum_equals_the_codec_around_the_reference():
    """bf16 momentum stored by the kernel with stochastic rounding: the same random bits as
    kernels.momentum, so the stored codes equal decode -> reference step -> encode."""
    from blockopt.kernels import momentum as mom

    model, plan, names, fresh = _setup(torch.float32)
    geoms = [plan[n].geometry for n in names]
    decay = [plan[n].weight_decay for n in names]
    seeds = [mom.name_seed(n) for n in names]
    g = torch.Generator().manual_seed(2)
    grads = [[torch.randn(p.shape, generator=g).to(DEVICE) for p in model.parameters()] for _ in range(10)]
    kw = {"lr": 1e-2, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8, "weight_decay": 0.1, "maximize": False}
    params, m, v, steps = fresh()
    m = [x.to(torch.bfloat16) for x in m]
    rparams, rm, rv, rsteps = fresh()
    rm = [x.to(torch.bfloat16) for x in rm]
    for gs in grads:
        adam_mini_triton(params, gs, m, v, steps, geoms, decay, seeds=seeds, **kw)
        m32 = [x.float() for x in rm]
        adam_mini_reference(rparams, gs, m32, rv, rsteps, geoms, decay, **kw)
        for x, y, seed, s in zip(rm, m32, seeds, rsteps):
            mom.encode_(x, y, mom.step_seed(seed, int(s.item())))
    same = sum((a == b).sum().item() for a, b in zip(m, rm))
    assert same / sum(x.numel() for x in m) >= 0.999  # a code can differ where fp32 m differs by an ulp
    for name, a, b in zip(names, params, rparams):
        assert max_rel_diff(a, b) <= 1e-5, name


def _int8_case():
    """Tensors with int8 momentum: rows shorter and longer than a scale group (256), ragged last
    groups, blocks of one row, of two rows (heads), of fused q|k|v rows, and a whole tensor."""
    from blockopt import Geometry

    shapes_geoms = [
        ((6, 700), Geometry(0, ((6, 1),))),  # 3 groups per row, the last one ragged
        ((8, 40), Geometry(0, ((8, 2),))),  # heads: 2 rows per block, 1 group
        ((8, 300), Geometry(0, ((4, 2), (2, 1), (2, 1)))),  # fused rows: q heads | k rows | v rows
        ((3, 4, 90), Geometry(-1, ((1080, 1080),))),  # one block: the whole tensor (rows of 360)
        ((2, 1500), Geometry(0, ((2, 1),))),  # 6 groups: two tiles of 4 groups per row
    ]
    g = torch.Generator().manual_seed(3)
    params = [torch.randn(s, generator=g).to(DEVICE) for s, _ in shapes_geoms]
    geoms = [geo for _, geo in shapes_geoms]
    return params, geoms, g


def test_triton_int8_momentum_equals_the_codec_around_the_reference():
    """int8 codes and scales written by the kernel equal decode -> reference step -> encode
    (the same random bits); a code may differ where fp32 m differs by an ulp."""
    from blockopt.kernels import momentum as mom

    params, geoms, g = _int8_case()
    seeds = [mom.name_seed(f"w{i}") for i in range(len(params))]
    nblocks = [sum(size // unit for size, unit in geo.segments) for geo in geoms]
    rparams = [p.clone() for p in params]
    state = [mom.new_state("int8", p) for p in params]
    rstate = [mom.new_state("int8", p) for p in params]
    v = [torch.zeros(n, device=DEVICE) for n in nblocks]
    rv = [x.clone() for x in v]
    steps = [torch.tensor(0.0) for _ in params]
    rsteps = [torch.tensor(0.0) for _ in params]
    kw = {"lr": 1e-2, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8, "weight_decay": 0.1, "maximize": False}
    decay = [True] * len(params)
    for _ in range(8):
        gs = [torch.randn(p.shape, generator=g).to(DEVICE) for p in params]
        adam_mini_triton(params, gs, [s["exp_avg"] for s in state], v, steps, geoms, decay, seeds=seeds,
                         scales=[s["exp_avg_scale"] for s in state], **kw)
        m32 = [mom.decode(s["exp_avg"], s["exp_avg_scale"]) for s in rstate]
        adam_mini_reference(rparams, gs, m32, rv, rsteps, geoms, decay, **kw)
        for s, y, seed, t in zip(rstate, m32, seeds, rsteps):
            mom.encode_(s["exp_avg"], y, mom.step_seed(seed, int(t.item())), s["exp_avg_scale"])
    total = sum(p.numel() for p in params)
    same = sum((a["exp_avg"] == b["exp_avg"]).sum().item() for a, b in zip(state, rstate))
    assert same / total >= 0.999
    assert all(s["exp_avg"].abs().max().item() == 127 for s in state)  # codes use their whole range
    for i, (a, b) in enumerate(zip(state, rstate)):
        assert max_rel_diff(a["exp_avg_scale"], b["exp_avg_scale"]) <= 1e-4, i
    for i, (a, b) in enumerate(zip(params, rparams)):
        assert max_rel_diff(a, b) <= 1e-4, i
    for a, b in zip(v, rv):
        assert max_rel_diff(a, b) <= TOL[torch.float32]


def test_triton_int8_bad_scales_are_refused_before_anything_changes():
    from blockopt import Geometry
    from blockopt.kernels import momentum as mom

    params, geoms, _ = _int8_case()
    state = [mom.new_state("int8", p) for p in params]
    codes = [s["exp_avg"] for s in state]
    scales = [s["exp_avg_scale"] for s in state]
    v = [torch.zeros(sum(size // unit for size, unit in geo.segments), device=DEVICE) for geo in geoms]
    steps = [torch.tensor(0.0) for _ in params]
    before = [p.clone() for p in params]
    grads = [torch.ones_like(p) for p in params]
    call = {"decay": [False] * len(params), "lr": 1e-2, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8, "weight_decay": 0.0,
                "maximize": False}
    with pytest.raises(ValueError, match="needs its exp_avg_scale"):
        adam_mini_triton(params, grads, codes, v, steps, geoms, **call)
    with pytest.raises(ValueError, match=r"exp_avg_scale has shape \(2, 3\); expected \(2, 6\)"):
        adam_mini_triton(params, grads, codes, v, steps, geoms, scales=[*scales[:4], torch.zeros(2, 3)], **call)
    elementwise = [*geoms[:4], Geometry(-1, ((3000, 1),))]
    with pytest.raises(ValueError, match="needs blocks of whole rows"):
        adam_mini_triton(params, grads, codes, v, steps, elementwise, scales=scales, **call)
    assert all(torch.equal(a, b) for a, b in zip(params, before))
    assert all(t.item() == 0 for t in steps)
    assert all(not c.any() for c in codes)


@pytest.mark.skipif(DEVICE == "cuda", reason="forces the Triton route on CPU tensors (interpreter)")
def test_adam_mini_int8_momentum_through_the_triton_route_equals_the_cpu_route(monkeypatch):
    """AdamMini(momentum_dtype="int8") hands codes and scales to the Triton step (no codec); its
    state equals the default CPU route's."""
    import copy

    from blockopt.kernels import load_cpu_kernel

    model = build_model("llama-tiny", vocab_size=16, n_layers=1, d_model=16, n_heads=2, max_seq_len=8, d_ff=16)
    other = copy.deepcopy(model)
    kw = {"lr": 1e-2, "betas": (0.9, 0.95), "weight_decay": 0.1, "momentum_dtype": "int8"}
    via_cpu = blockopt.AdamMini(other, rules="official", **kw)
    via_triton = blockopt.AdamMini(model, rules="official", **kw)
    gen = torch.Generator().manual_seed(4)
    for _ in range(6):
        for m in (model, other):
            for p in m.parameters():
                p.grad = None
        for p, q in zip(model.parameters(), other.parameters()):
            p.grad = torch.randn(p.shape, generator=gen)
            q.grad = p.grad.clone()
        step_through_triton(via_triton, monkeypatch)
        via_cpu.step()
    assert set(via_triton.routes.values()) == {"triton"}
    # the fused C++ kernel; foreach + codec where it is not built (BLOCKOPT_DISABLE_CPU_KERNEL=1)
    expected = {"fused_cpu"} if load_cpu_kernel() is not None else {"foreach"}
    assert set(via_cpu.routes.values()) == expected
    n_int8 = 0
    for (name, p), q in zip(model.named_parameters(), other.parameters()):
        a, b = via_triton.state[p], via_cpu.state[q]
        assert a["exp_avg"].dtype == b["exp_avg"].dtype, name
        n_int8 += a["exp_avg"].dtype == torch.int8
        assert (a["exp_avg"] == b["exp_avg"]).float().mean().item() >= 0.999, name
        if "exp_avg_scale" in a:
            assert max_rel_diff(a["exp_avg_scale"], b["exp_avg_scale"]) <= 1e-4, name
        assert max_rel_diff(p, q) <= 1e-4, name
    assert n_int8 >= 5


@pytest.mark.parametrize("momentum", [torch.float32, torch.bfloat16])
def test_triton_multi_tensor_launch_equals_one_launch_per_segment(momentum):
    """The table-driven launches (the default) give the per-segment launches' results bit for bit:
    rows, heads, fused q|k|v rows, whole tensors and per-element blocks; fp32, bf16 and fp16
    parameters (a launch per dtype); decayed and not; 7 steps."""
    from blockopt import Geometry
    from blockopt.kernels import momentum as mom

    cases = [
        ((6, 40), Geometry(0, ((6, 1),)), torch.float32, True),
        ((8, 12), Geometry(0, ((8, 2),)), torch.float32, False),
        ((8, 20), Geometry(0, ((4, 2), (2, 1), (2, 1))), torch.float32, True),
        ((3, 50), Geometry(-1, ((150, 150),)), torch.bfloat16, True),
        ((2100,), Geometry(-1, ((2100, 1),)), torch.float32, False),  # per-element: 3 programs of 1024
        ((7,), Geometry(-1, ((7, 1),)), torch.float16, False),
        ((4, 1500), Geometry(0, ((4, 1),)), torch.float16, True),  # blocks longer than a tile
    ]
    g = torch.Generator().manual_seed(5)
    init = [torch.randn(shape, generator=g).to(DEVICE, dtype) for shape, _, dtype, _ in cases]
    geoms = [c[1] for c in cases]
    decay = [c[3] for c in cases]
    seeds = [mom.name_seed(f"t{i}") for i in range(len(cases))]
    grads = [[torch.randn(x.shape, generator=g).to(DEVICE, x.dtype) for x in init] for _ in range(7)]

    def run(multi_tensor):
        params = [x.clone() for x in init]
        m = [torch.zeros(x.shape, device=DEVICE, dtype=momentum) for x in init]
        v = [torch.zeros(sum(size // unit for size, unit in geo.segments), device=DEVICE) for geo in geoms]
        steps = [torch.tensor(0.0) for _ in init]
        for gs in grads:
            adam_mini_triton(params, gs, m, v, steps, geoms, decay, lr=3e-2, beta1=0.9, beta2=0.95, eps=1e-8,
                             weight_decay=0.1, maximize=False, seeds=seeds, multi_tensor=multi_tensor)
        return params, m, v

    fast, slow = run(True), run(False)
    for kind, a_list, b_list in zip(("param", "exp_avg", "v"), fast, slow):
        for i, (a, b) in enumerate(zip(a_list, b_list)):
            assert torch.equal(a, b), (kind, i)
    assert not torch.equal(fast[0][0], init[0])
