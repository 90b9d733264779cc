"""The fused CPU kernel against the reference loop."""

from __future__ import annotations

import copy
import os
import shutil

import pytest
import torch
from conftest import TOL, max_rel_diff
from torch import nn

import blockopt
from blockopt.bench.models import build_model
from blockopt.kernels import fused_cpu_supports, load_cpu_kernel
from blockopt.kernels.adam_mini_cpu import cpu_kernel_error

needs_compiler = pytest.mark.skipif(
    (shutil.which("c++") is None and shutil.which("g++") is None)
    or os.environ.get("BLOCKOPT_DISABLE_CPU_KERNEL", "") not in ("", "0"),
    reason="no C++ compiler, or BLOCKOPT_DISABLE_CPU_KERNEL is set: the fused CPU kernel is not built")


@needs_compiler
def test_kernel_builds_here():
    assert load_cpu_kernel() is not None, cpu_kernel_error()


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
    kw = {"lr": 1e-2, "betas": (0.9, 0.95), "weight_decay": 0.1, "maximize": maximize}
    fast = blockopt.AdamMini(model, rules="official", fused=True, **kw)
    slow = blockopt.AdamMini(ref, rules="official", foreach=False, **kw)
    used = [n for n, p in model.named_parameters() if fused_cpu_supports(p, p, fast.plan[n].geometry)]
    assert any(".q_proj." in n for n in used) and any(".mlp." in n for n in used)
    _random_steps([(model, fast), (ref, slow)], 20)
    # the C++ kernel stepped every tensor it supports (no silent fallback to foreach)
    assert {n for n in used if fast.routes[n] != "fused_cpu"} <= {n for n in used if fast.plan[n].kind == "element"}
    assert set(fast.routes.values()) <= {"fused_cpu", "adamw"} and set(slow.routes.values()) == {"reference"}
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert max_rel_diff(p, q) <= TOL[torch.float32], name
        assert max_rel_diff(fast.state[p]["exp_avg"], slow.state[q]["exp_avg"]) <= TOL[torch.float32], name
        assert max_rel_diff(fast.state[p]["block_exp_avg_sq"], slow.state[q]["block_exp_avg_sq"]) <= TOL[torch.float32], name


@needs_compiler
def test_fused_handles_fused_qkv_whole_tensor_and_conv_blocks():
    model = nn.Sequential(nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True), nn.Conv1d(32, 8, 3))
    ref = copy.deepcopy(model)
    fast = blockopt.AdamMini(model, rules="official", lr=1e-2, fused=True, overrides={r"0\.norm1\.weight": "tensor"})
    slow = blockopt.AdamMini(ref, rules="official", lr=1e-2, foreach=False, overrides={r"0\.norm1\.weight": "tensor"})
    assert fast.plan["0.self_attn.in_proj_weight"].kind == "fused"
    _random_steps([(model, fast), (ref, slow)], 20, scale=1e-3)
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert max_rel_diff(p, q) <= TOL[torch.float32], name


def test_supports_only_what_it_handles():
    p = torch.zeros(4, 6)
    rows = blockopt.Geometry(0, ((4, 1),))
    assert fused_cpu_supports(p, p, rows)
    assert fused_cpu_supports(p, p, blockopt.Geometry(-1, ((24, 1),)))  # per element: plain Adam in the kernel
    assert fused_cpu_supports(p, p, blockopt.Geometry(-1, ((24, 24),)))  # whole tensor
    assert fused_cpu_supports(p, p, blockopt.Geometry(1, ((6, 1),)))  # columns of a [in, out] weight
    assert fused_cpu_supports(p, p.to(torch.int8), blockopt.Geometry(1, ((6, 1),)))  # int8 codes along rows
    assert fused_cpu_supports(p, p.to(torch.int8), blockopt.Geometry(-1, ((24, 1),)))  # ... and elements
    assert not fused_cpu_supports(p, p.to(torch.int8), blockopt.Geometry(-1, ((12, 2), (12, 1))))  # not pairs
    assert not fused_cpu_supports(p[0], p[0].to(torch.int8), blockopt.Geometry(-1, ((6, 1),)))  # rows of 2-D+
    assert not fused_cpu_supports(p.t(), p.t(), blockopt.Geometry(0, ((6, 1),)))  # non-contiguous
    assert not fused_cpu_supports(p.bfloat16(), p, rows)
    assert not fused_cpu_supports(p.double(), p.double(), rows)


def test_fused_flag_errors(monkeypatch):
    model = build_model("llama-tiny", vocab_size=32, n_layers=1, d_model=32)
    with pytest.raises(ValueError, match="fused=True with foreach=False"):
        blockopt.AdamMini(model, rules="official", fused=True, foreach=False)
    with pytest.raises(ValueError, match="Invalid fused: 'yes'"):
        blockopt.AdamMini(model, rules="official", fused="yes")


@needs_compiler
@pytest.mark.parametrize("maximize", [False, True])
def test_kernel_mixes_per_element_row_and_whole_tensor_blocks_in_one_call(maximize):
    """The kernel itself (the optimizer sends per-element blocks to torch's fused AdamW instead)."""
    from blockopt.kernels import adam_mini_fused_cpu, adam_mini_reference

    shapes = [(40,), (16, 24), (3, 5, 7), (70000,)]
    geoms = [blockopt.Geometry(-1, ((40, 1),)), blockopt.Geometry(0, ((16, 1),)),
             blockopt.Geometry(-1, ((105, 105),)), blockopt.Geometry(-1, ((70000, 1),))]
    g = torch.Generator().manual_seed(11)
    sets = []
    for _ in range(2):
        ps = [torch.randn(s, generator=torch.Generator().manual_seed(i)) for i, s in enumerate(shapes)]
        ms = [torch.zeros(s) for s in shapes]
        vs = [torch.zeros(geo.num_blocks) for geo in geoms]
        steps = [torch.tensor(0.0) for _ in shapes]
        sets.append((ps, ms, vs, steps))
    kw = {"lr": 1e-2, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8, "weight_decay": 0.1, "maximize": maximize}
    decay = [True, True, False, False]
    for _ in range(20):
        grads = [torch.randn(s, generator=g) for s in shapes]
        for fn, (ps, ms, vs, steps) in zip((adam_mini_fused_cpu, adam_mini_reference), sets):
            fn(ps, [x.clone() for x in grads], ms, vs, steps, geoms, decay, **kw)
    for a, b in zip(sets[0], sets[1]):
        for x, y in zip(a, b):
            assert max_rel_diff(x, y) <= TOL[torch.float32]


def _one_step_results(model, threads, **kw):
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        opt = blockopt.AdamMini(model, rules="official", lr=1e-2, fused=True, **kw)
        _random_steps([(model, opt)], 3, seed=1)
    finally:
        torch.set_num_threads(old)
    return [p.detach().clone() for p in model.parameters()], opt


@needs_compiler
def test_fused_result_does_not_depend_on_the_thread_split():
    """Blocks are never split across threads, so 1 and 2 threads give the same bits."""
    base = build_model("gpt2-tiny", vocab_size=96, n_layers=2, d_model=64)
    one, _ = _one_step_results(copy.deepcopy(base), 1)
    two, _ = _one_step_results(copy.deepcopy(base), 2)
    for a, b in zip(one, two):
        assert torch.equal(a, b)


@needs_compiler
def test_fused_strided_gradients_and_blocks_larger_than_a_chunk():
    """A transposed (non-contiguous) gradient and a whole-tensor block of 2**17 elements."""
    model = nn.Sequential(nn.Linear(512, 256), nn.Linear(256, 8))
    ref = copy.deepcopy(model)
    kw = {"lr": 1e-2, "weight_decay": 0.1, "overrides": {r"0\.weight": "tensor"}}
    fast = blockopt.AdamMini(model, rules="official", fused=True, **kw)
    slow = blockopt.AdamMini(ref, rules="official", foreach=False, **kw)
    g = torch.Generator().manual_seed(3)
    for _ in range(20):
        grads = [torch.randn(tuple(reversed(p.shape)) if p.dim() == 2 else p.shape, generator=g) for p in model.parameters()]
        for m, opt in ((model, fast), (ref, slow)):
            for p, grad in zip(m.parameters(), grads):
                p.grad = grad.t() if grad.dim() == 2 else grad.clone()
            opt.step()
    assert not model[0].weight.grad.is_contiguous()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert max_rel_diff(p, q) <= TOL[torch.float32], name
        assert max_rel_diff(fast.state[p]["block_exp_avg_sq"], slow.state[q]["block_exp_avg_sq"]) <= TOL[torch.float32]


@needs_compiler
def test_cached_step_lists_follow_frozen_parameters_state_loads_and_clears():
    """The step caches its per-group lists; they must follow changes in which parameters have
    gradients, a loaded state, and a cleared state, exactly as the uncached reference does."""
    model = build_model("llama-tiny", vocab_size=64, n_layers=1, d_model=32)
    ref = copy.deepcopy(model)
    fast = blockopt.AdamMini(model, rules="official", lr=1e-2, fused=True)
    slow = blockopt.AdamMini(ref, rules="official", lr=1e-2, foreach=False)
    _random_steps([(model, fast), (ref, slow)], 3)
    saved = copy.deepcopy(fast.state_dict())
    # a parameter without a gradient is skipped; it moves again when its gradient returns
    frozen = [i for i, (n, _) in enumerate(model.named_parameters()) if n.endswith("q_proj.weight")]
    g = torch.Generator().manual_seed(5)
    for step in range(4):
        grads = [torch.randn(p.shape, generator=g) for p in model.parameters()]
        for m, opt in ((model, fast), (ref, slow)):
            for i, (p, grad) in enumerate(zip(m.parameters(), grads)):
                p.grad = None if (i in frozen and step < 2) else grad.clone()
            opt.step()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert max_rel_diff(p, q) <= TOL[torch.float32], name
        assert fast.state[p]["step"].item() == slow.state[q]["step"].item(), name
    # load the saved state: the next steps use the loaded tensors, not the cached ones
    fast.load_state_dict(saved)
    slow.load_state_dict(saved)
    _random_steps([(model, fast), (ref, slow)], 2, seed=7)
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert max_rel_diff(p, q) <= TOL[torch.float32], name
        assert fast.state[p]["step"].item() == 5.0, name  # 3 saved + 2
    # a cleared state starts again from step 1 (as torch.optim does), with new tensors in the state
    fast.state.clear()
    _random_steps([(model, fast)], 1)
    assert all(s["step"].item() == 1.0 for s in fast.state.values())
    assert len(fast.state) == len(list(model.parameters()))


@needs_compiler
@pytest.mark.parametrize("momentum_dtype", [None, torch.bfloat16, "int8"])
def test_fused_column_blocks_of_hf_gpt2_conv1d_equal_reference(momentum_dtype):
    """Hugging Face GPT-2 stores weights [in, out]: its blocks are columns, and c_attn is fused
    q | k | v along the columns. The kernel walks them in place (no transposed copy)."""
    transformers = pytest.importorskip("transformers", reason="needs pip install 'blockopt[hf]'")
    cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=50, n_positions=16)
    model = transformers.GPT2LMHeadModel(cfg)
    ref = copy.deepcopy(model)
    kw = {"lr": 1e-2, "betas": (0.9, 0.95), "weight_decay": 0.1, "momentum_dtype": momentum_dtype}
    fast = blockopt.AdamMini(model, rules="official", fused=True, **kw)
    slow = blockopt.AdamMini(ref, rules="official", foreach=False, **kw)
    assert fast.plan["transformer.h.0.attn.c_attn.weight"].geometry.axis == 1
    _random_steps([(model, fast), (ref, slow)], 20)
    assert fast.routes["transformer.h.0.attn.c_attn.weight"] == "fused_cpu"
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        tol = 1e-4 if momentum_dtype == "int8" else TOL[torch.float32]  # int8: a rare code differs (sqrt rounding)
        assert max_rel_diff(p, q) <= tol, name
        assert max_rel_diff(fast.state[p]["block_exp_avg_sq"], slow.state[q]["block_exp_avg_sq"]) <= TOL[torch.float32], name
        if momentum_dtype == torch.bfloat16:
            assert torch.equal(fast.state[p]["exp_avg"], slow.state[q]["exp_avg"]), name
        elif momentum_dtype == "int8":
            same = (fast.state[p]["exp_avg"] == slow.state[q]["exp_avg"]).float().mean().item()
            assert same >= 0.999, name


@needs_compiler
def test_int8_momentum_of_per_element_blocks_is_stepped_by_the_kernel_in_whole_rows(monkeypatch):
    """The default plan gives some matrices per-element second moments (the budget); with int8 momentum
    the kernel steps them row by row (chunks of whole rows, here forced small) and equals the reference
    loop around the int8 codec."""
    from blockopt.kernels import adam_mini_cpu

    monkeypatch.setattr(adam_mini_cpu, "CHUNK_ELEMENTS", 300)  # rows of 32: chunks of 9 rows
    adam_mini_cpu._chunks_of.cache_clear()
    adam_mini_cpu._table.cache_clear()
    model = build_model("llama-tiny", vocab_size=40, n_layers=1, d_model=32)
    ref = copy.deepcopy(model)
    kw = {"lr": 1e-2, "betas": (0.9, 0.95), "weight_decay": 0.1, "momentum_dtype": "int8",
          "overrides": {r"embed\.weight|.*mlp.*": "element"}}
    fast, slow = blockopt.AdamMini(model, **kw), blockopt.AdamMini(ref, foreach=False, **kw)
    _random_steps([(model, fast), (ref, slow)], 12)
    adam_mini_cpu._chunks_of.cache_clear()
    adam_mini_cpu._table.cache_clear()
    assert fast.routes["embed.weight"] == "fused_cpu" and slow.routes["embed.weight"] == "reference"
    assert fast.state[model.embed.weight]["exp_avg"].dtype == torch.int8
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert max_rel_diff(p, q) <= 1e-4, name
        same = (fast.state[p]["exp_avg"] == slow.state[q]["exp_avg"]).float().mean().item()
        assert same >= 0.999, name


def test_a_build_lock_left_by_a_killed_build_is_removed_with_a_warning_and_a_fresh_one_is_kept(tmp_path):
    """torch waits forever while an extension's ``lock`` file exists; a killed build leaves one behind."""
    import os
    import time

    from blockopt.kernels.adam_mini_cpu import STALE_LOCK_SECONDS, clear_stale_lock

    assert not clear_stale_lock(tmp_path)  # no lock
    lock = tmp_path / "lock"
    lock.write_text("")
    assert not clear_stale_lock(tmp_path) and lock.exists()  # a build in progress
    old = time.time() - STALE_LOCK_SECONDS - 60
    os.utime(lock, (old, old))
    with pytest.warns(UserWarning, match=r"removing .*lock, a build lock left \d+ s ago"):
        assert clear_stale_lock(tmp_path)
    assert not lock.exists()
