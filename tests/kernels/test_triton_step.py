"""The Triton step against the reference loop (interpreter on CPU, real kernels on a GPU)."""

from __future__ import annotations

import pytest
import torch

import blockopt
from blockopt.bench.models import build_model
from blockopt.kernels import adam_mini_reference
from conftest import TOL, max_rel_diff

triton = pytest.importorskip("triton", reason="Triton is not installed (pip install 'blockopt[gpu]')")
from blockopt.kernels.adam_mini_triton import adam_mini_triton  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _setup(dtype, style="gpt2"):
    model = build_model(f"{style}-tiny", vocab_size=16, n_layers=1, d_model=16, n_heads=2, max_seq_len=8)
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
    kw = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, maximize=False)
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
    kw = dict(lr=1e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.0, maximize=True)
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
    kw = dict(lr=1e-2, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, maximize=False)
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
