"""Every step route on what modern models bring: stacked expert weights (3-D geometry, both layouts),
``state_dtype`` below the parameters' precision, and ``torch.compile``'s names (the compiled step
itself: tests/optim/test_compile.py)."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from conftest import TOL, TinyMoE, max_rel_diff, token_batches, train
from torch import nn

import blockopt
from blockopt.kernels import Geometry, adam_mini_reference, load_cpu_kernel
from blockopt.kernels.adam_mini_cpu import cpu_kernel_error

ROUTES = {"reference": {"foreach": False}, "foreach": {"fused": False}, "fused": {}}


def _routes_ran(opt) -> set[str]:
    return set(opt.routes.values())


def _run(model, opt, n=6):
    train(model, opt, token_batches(11, n, batch=3, seq=5))


def test_plan_of_the_tiny_moe():
    plan = blockopt.partition(TinyMoE())
    assert plan["experts.gate_up_proj"].geometry == Geometry(-1, ((5 * 8 * 8, 8),))  # [5, 8 out, 8 in]
    assert plan["experts_t.gate_up_proj"].geometry == Geometry(2, ((5 * 8, 1),))  # [5, 8 in, 8 out]
    assert plan["experts_t.down_proj"].num_blocks == 5 * 8
    assert plan["experts_t.gate_up_proj_bias"].kind == "element"
    assert plan["router.weight"].role == "router"


@pytest.mark.parametrize("route", ["foreach", "fused"])
def test_expert_geometry_on_every_cpu_route_equals_the_reference_loop(route):
    if route == "fused" and load_cpu_kernel() is None:
        pytest.skip(f"the fused CPU kernel is not built: {cpu_kernel_error()}")
    model, ref = TinyMoE(), TinyMoE()
    fast = blockopt.AdamMini(model, rules="official", lr=1e-2, weight_decay=0.1, **ROUTES[route])
    slow = blockopt.AdamMini(ref, rules="official", lr=1e-2, weight_decay=0.1, foreach=False)
    _run(model, fast)
    _run(ref, slow)
    assert _routes_ran(fast) >= ({"fused_cpu"} if route == "fused" else {"foreach"})
    if route == "fused":  # both expert layouts went through the C++ kernel, not a fallback
        on_cpu = {n for n, r in fast.routes.items() if r == "fused_cpu"}
        assert {"experts.gate_up_proj", "experts_t.gate_up_proj", "experts_t.down_proj"} <= on_cpu
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert max_rel_diff(p, q) <= TOL[torch.float32], name
        assert max_rel_diff(fast.state[p]["block_exp_avg_sq"], slow.state[q]["block_exp_avg_sq"]) <= TOL[torch.float32]


@pytest.mark.parametrize("fmt", [torch.bfloat16, "int8"], ids=["bf16", "int8"])
def test_compact_momentum_on_expert_geometry_equals_the_reference_loop(fmt):
    model, ref = TinyMoE(), TinyMoE()
    kw = {"lr": 1e-2, "weight_decay": 0.1, "momentum_dtype": fmt}
    fast = blockopt.AdamMini(model, rules="official", **kw)
    slow = blockopt.AdamMini(ref, rules="official", foreach=False, **kw)
    _run(model, fast)
    _run(ref, slow)
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        a, b = fast.state[p], slow.state[q]
        assert a["exp_avg"].dtype == b["exp_avg"].dtype != torch.float32
        # bf16 codes agree exactly; an int8 code may flip where the two paths round differently
        # (a flip moves its own weight by at most one step, lr)
        assert (p - q).abs().max().item() <= (1e-5 if fmt is torch.bfloat16 else kw["lr"]), name


def test_triton_on_stacked_rows_equals_the_reference_and_declines_stacked_columns():
    pytest.importorskip("triton", reason="Triton is not installed (pip install 'blockopt[gpu]')")
    from blockopt.kernels.adam_mini_triton import adam_mini_triton, triton_supports

    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(0)
    shape, geo = (5, 6, 4), Geometry(-1, ((120, 4),))
    p0 = torch.randn(shape, generator=g)
    grads = [torch.randn(shape, generator=g) for _ in range(5)]
    out = []
    for fn in (adam_mini_triton, adam_mini_reference):
        p = p0.clone().to(device)
        m, v, t = torch.zeros_like(p), torch.zeros(30, device=device), torch.tensor(0.0, device=device)
        for grad in grads:
            fn([p], [grad.to(device)], [m], [v], [t], [geo], [True], lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8,
               weight_decay=0.1, maximize=False)
        out.append(p.cpu())
    assert max_rel_diff(out[0], out[1]) <= TOL[torch.float32]
    stacked_columns = Geometry(2, ((20, 1),))
    assert not triton_supports(p0, torch.zeros_like(p0), stacked_columns)  # such tensors take foreach on CUDA


@pytest.mark.parametrize("state_dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("route", ["foreach", "fused"])
def test_low_precision_state_on_fp32_parameters_equals_the_reference_on_every_route(route, state_dtype):
    """state_dtype bf16/fp16 with fp32 parameters: the arithmetic runs in the state dtype, which the
    fused kernels do not do; they hand such tensors to foreach (no crash, same numbers)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    ref = copy.deepcopy(model)
    kw = {"lr": 1e-2, "weight_decay": 0.1, "eps": 1e-3, "state_dtype": state_dtype}  # eps representable in fp16
    fast = blockopt.AdamMini(model, rules="official", **ROUTES[route], **kw)
    slow = blockopt.AdamMini(ref, rules="official", foreach=False, **kw)
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        x = torch.randn(6, 8, generator=g)
        for m, o in ((model, fast), (ref, slow)):
            o.zero_grad()
            m(x).pow(2).mean().backward()
            o.step()
    assert _routes_ran(fast) == {"foreach"}
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert fast.state[p]["exp_avg"].dtype == state_dtype
        assert torch.isfinite(p).all(), name
        assert max_rel_diff(p, q) <= TOL[torch.bfloat16], name  # both round the weights to the state dtype


# --- torch.compile -------------------------------------------------------------------------------------
def _small():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def _one_step(model, opt):
    opt.zero_grad()
    model(torch.randn(5, 8, generator=torch.Generator().manual_seed(2))).pow(2).mean().backward()
    opt.step()


@pytest.mark.parametrize("direction", ["compiled to plain", "plain to compiled"])
def test_state_saved_with_or_without_compile_loads_into_the_other(direction):
    plain = _small()
    compiled = torch.compile(copy.deepcopy(plain))
    src, dst = (compiled, plain) if direction == "compiled to plain" else (plain, compiled)
    opt = blockopt.AdamMini(src, rules="official", lr=1e-2)
    _one_step(src, opt)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    other = blockopt.AdamMini(dst, rules="official", lr=1e-2)
    other.load_state_dict(torch.load(buf, weights_only=True))
    for p, q in zip(src.parameters(), dst.parameters()):
        assert torch.equal(opt.state[p]["exp_avg"], other.state[q]["exp_avg"])

