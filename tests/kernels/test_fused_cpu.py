"""The fused CPU kernel against the reference loop."""

from __future__ import annotations

import copy
import shutil

import pytest
import torch
from torch import nn

import blockopt
from blockopt.bench.models import build_model
from blockopt.kernels import fused_cpu_supports, load_cpu_kernel
from conftest import TOL, max_rel_diff

needs_compiler = pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                                    reason="no C++ compiler: the fused CPU kernel cannot be built")


@needs_compiler
def test_kernel_builds_here():
    assert load_cpu_kernel() is not None


def _random_steps(models_and_opts, steps, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    first = models_and_opts[0][0]
    for _ in range(steps):
        grads = [torch.randn(p.shape, generator=g) * scale for p in first.parameters()]
        for model, opt in models_and_opts:
            for p, grad in zip(model.parameters(), grads):
                p.grad = grad.clone()
            opt.step()


@needs_compiler
@pytest.mark.parametrize("style", ["llama", "gpt2"])
@pytest.mark.parametrize("maximize", [False, True])
def test_fused_equals_reference_fp32_after_20_steps(style, maximize):
    model = build_model(f"{style}-tiny", vocab_size=96, n_layers=2, d_model=64)
    ref = copy.deepcopy(model)
    kw = dict(lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, maximize=maximize)
    fast = blockopt.AdamMini(model, fused=True, **kw)
    slow = blockopt.AdamMini(ref, foreach=False, **kw)
    used = [n for n, p in model.named_parameters() if fused_cpu_supports(p, p, fast.plan[n].geometry)]
    assert any(".q_proj." in n for n in used) and any(".mlp." in n for n in used)
    _random_steps([(model, fast), (ref, slow)], 20)
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert max_rel_diff(p, q) <= TOL[torch.float32], name
        assert max_rel_diff(fast.state[p]["exp_avg"], slow.state[q]["exp_avg"]) <= TOL[torch.float32], name
        assert max_rel_diff(fast.state[p]["block_exp_avg_sq"], slow.state[q]["block_exp_avg_sq"]) <= TOL[torch.float32], name


@needs_compiler
def test_fused_handles_fused_qkv_whole_tensor_and_conv_blocks():
    model = nn.Sequential(nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True), nn.Conv1d(32, 8, 3))
    ref = copy.deepcopy(model)
    fast = blockopt.AdamMini(model, lr=1e-2, fused=True, overrides={r"0\.norm1\.weight": "tensor"})
    slow = blockopt.AdamMini(ref, lr=1e-2, foreach=False, overrides={r"0\.norm1\.weight": "tensor"})
    assert fast.plan["0.self_attn.in_proj_weight"].kind == "fused"
    _random_steps([(model, fast), (ref, slow)], 20, scale=1e-3)
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert max_rel_diff(p, q) <= TOL[torch.float32], name


def test_supports_only_what_it_handles():
    p = torch.zeros(4, 6)
    rows = blockopt.Geometry(0, ((4, 1),))
    assert fused_cpu_supports(p, p, rows)
    assert not fused_cpu_supports(p, p, blockopt.Geometry(-1, ((24, 1),)))  # per element: foreach
    assert not fused_cpu_supports(p, p, blockopt.Geometry(1, ((6, 1),)))  # columns
    assert not fused_cpu_supports(p.t(), p.t(), blockopt.Geometry(0, ((6, 1),)))  # non-contiguous
    assert not fused_cpu_supports(p.bfloat16(), p, rows)
    assert not fused_cpu_supports(p.double(), p.double(), rows)


def test_fused_flag_errors(monkeypatch):
    model = build_model("llama-tiny", vocab_size=32, n_layers=1, d_model=32)
    with pytest.raises(ValueError, match="fused=True with foreach=False"):
        blockopt.AdamMini(model, fused=True, foreach=False)
    with pytest.raises(ValueError, match="Invalid fused: 'yes'"):
        blockopt.AdamMini(model, fused="yes")
