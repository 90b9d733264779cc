"""Low-precision first moment: bf16 with stochastic rounding and int8 codes (AdamMini(momentum_dtype=...))."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from conftest import TOL, max_rel_diff

import blockopt
from blockopt.kernels import load_cpu_kernel
from blockopt.kernels import momentum as mom
from blockopt.kernels.adam_mini_cpu import cpu_kernel_error
from blockopt.models import build_model

FORMATS = {"bf16": torch.bfloat16, "int8": "int8"}


def _model():
    return build_model("gpt2-tiny", vocab_size=96, n_layers=2, d_model=64)


def _steps(pairs, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    first = pairs[0][0]
    for _ in range(n):
        grads = [torch.randn(p.shape, generator=g) for p in first.parameters()]
        for model, opt in pairs:
            for p, grad in zip(model.parameters(), grads):
                p.grad = grad.clone()
            opt.step()


# --- the storage formats --------------------------------------------------------------------------
def test_hash_matches_the_python_integer_version():
    idx = torch.arange(0, 5000, 7, dtype=torch.int64)
    want = [mom.hash32_int(((i * 0x9E3779B9) + 12345) & 0xFFFFFFFF) for i in idx.tolist()]
    assert mom.hash32(12345, idx).tolist() == want


def test_bf16_stochastic_rounding_is_unbiased_and_brackets_the_value():
    x = torch.full((200_000,), 1.0 + 2**-10)  # between two bf16 neighbours, 1/8 of the way up
    m = torch.empty(x.shape, dtype=torch.bfloat16)
    mom.encode_(m, x, seed=3)
    got = m.float()
    lo, hi = 1.0, 1.0 + 2**-7
    assert set(got.unique().tolist()) == {lo, hi}
    assert abs(got.mean().item() - x[0].item()) < 2e-5  # E = x; round-to-nearest would give 1.0


def test_int8_roundtrip_error_is_bounded_by_the_code_spacing_and_unbiased():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 700, generator=g) * torch.logspace(-4, 0, 700)  # a wide range inside each row
    state = mom.new_state("int8", x)
    assert state["exp_avg"].dtype == torch.int8 and state["exp_avg_scale"].shape == (64, 3)
    mom.encode_(state["exp_avg"], x, seed=1, scale=state["exp_avg_scale"])
    y = mom.decode(state["exp_avg"], state["exp_avg_scale"])
    amax = x.abs().view(64, -1)
    amax = torch.stack([amax[:, 0:256].amax(1), amax[:, 256:512].amax(1), amax[:, 512:].amax(1)], 1)
    torch.testing.assert_close(state["exp_avg_scale"], amax, rtol=0, atol=0)
    bound = torch.repeat_interleave(amax, torch.tensor([256, 256, 188]), dim=1) * 255 / 127**2
    assert ((y - x).abs() <= bound * (1 + 1e-6)).all()
    # stochastic rounding: averaging many encodings recovers the value far below the group maximum
    small = x[0, 255].item()
    reps = torch.stack([mom.decode(*_encoded(x[:1], seed))[0, 255] for seed in range(400)])  # row 0: its own scales
    assert abs(reps.mean().item() - small) < 0.1 * abs(small) + 1e-3 * amax[0, 0].item() / 127


def _encoded(x, seed):
    st = mom.new_state("int8", x)
    mom.encode_(st["exp_avg"], x, seed=seed, scale=st["exp_avg_scale"])
    return st["exp_avg"], st["exp_avg_scale"]


def test_one_dimensional_tensors_keep_bf16_under_int8():
    assert mom.format_for("int8", (384,)) == "bf16"
    assert mom.format_for("int8", (4, 3)) == "int8"
    assert set(mom.new_state("int8", torch.zeros(5))) == {"exp_avg"}


# --- AdamMini -------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_fused_kernel_equals_the_codec_around_the_reference_loop(fmt):
    """The C++ kernel stores m inline; the reference loop runs on decoded fp32 and encodes after.
    Same hash and formulas, so bf16 codes agree exactly and int8 codes all but never differ."""
    if load_cpu_kernel() is None:
        pytest.skip(f"the fused CPU kernel is not built: {cpu_kernel_error()}")
    model = _model()
    ref = copy.deepcopy(model)
    kw = {"lr": 1e-2, "betas": (0.9, 0.95), "weight_decay": 0.1, "momentum_dtype": FORMATS[fmt]}
    fast = blockopt.AdamMini(model, rules="official", fused=True, **kw)
    slow = blockopt.AdamMini(ref, rules="official", foreach=False, **kw)
    _steps([(model, fast), (ref, slow)], 20)
    assert "fused_cpu" in set(fast.routes.values())
    same = total = moved = 0
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        a, b = fast.state[p], slow.state[q]
        assert a["exp_avg"].dtype == b["exp_avg"].dtype != torch.float32
        if a["exp_avg"].dtype == torch.bfloat16:
            assert torch.equal(a["exp_avg"], b["exp_avg"]), name
        same += (a["exp_avg"] == b["exp_avg"]).sum().item()
        total += a["exp_avg"].numel()
        if fmt == "bf16":
            assert max_rel_diff(p, q) <= TOL[torch.float32], name
        else:
            # the kernel and the reference loop round differently in float32, so a rare code flips (AMD EPYC:
            # 1 of 105k after 20 steps, its weight moved 1.25e-3); a flip moves its own weight by up to one step
            d = (p - q).detach().abs()
            assert d.max().item() <= kw["lr"], name
            moved += (d > 1e-6).sum().item()
        assert max_rel_diff(a["block_exp_avg_sq"], b["block_exp_avg_sq"]) <= TOL[torch.float32], name
    assert same / total >= 0.9999
    assert moved <= total - same + 2  # only weights whose codes flipped (a flip moves one weight)


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_foreach_path_with_compact_momentum_equals_the_reference(fmt):
    model = _model()
    ref = copy.deepcopy(model)
    kw = {"lr": 1e-2, "weight_decay": 0.1, "momentum_dtype": FORMATS[fmt]}
    a = blockopt.AdamMini(model, rules="official", fused=False, **kw)
    b = blockopt.AdamMini(ref, rules="official", foreach=False, **kw)
    _steps([(model, a), (ref, b)], 10)
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert max_rel_diff(p, q) <= 1e-4, name


@pytest.mark.parametrize("fmt,limit", [("bf16", 0.26), ("int8", 0.14)])
def test_state_bytes_of_gpt2_small_shape_measured_and_from_the_plan(fmt, limit):
    model = build_model("gpt2-160m", seed=None)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt = blockopt.AdamMini(model, rules="official", momentum_dtype=FORMATS[fmt])
    opt.step()
    measured = sum(t.nbytes for s in opt.state.values() for k, t in s.items() if k != "step")
    adamw = 8 * sum(p.numel() for p in model.parameters())  # AdamW: exp_avg + exp_avg_sq in fp32
    planned = opt.plan.state_bytes(momentum_dtype=FORMATS[fmt])
    assert measured == planned
    assert measured / adamw <= limit, measured / adamw
    assert opt.plan.state_bytes() / opt.plan.adamw_state_bytes() > 0.5  # fp32 momentum: about half


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_checkpoint_holds_the_compact_form_and_resumes_bit_identically(fmt):
    model = _model()
    opt = blockopt.AdamMini(model, rules="official", lr=1e-2, momentum_dtype=FORMATS[fmt])
    _steps([(model, opt)], 4)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    _steps([(model, opt)], 3, seed=9)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    dtypes = {t.dtype for s in ckpt["opt"]["state"].values() for t in s.values()}
    assert (torch.int8 if fmt == "int8" else torch.bfloat16) in dtypes
    resumed = _model()
    resumed.load_state_dict(ckpt["model"])
    opt2 = blockopt.AdamMini(resumed, rules="official", lr=1e-2, momentum_dtype=FORMATS[fmt])
    opt2.load_state_dict(ckpt["opt"])
    _steps([(resumed, opt2)], 3, seed=9)
    for p, q in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(p, q)


def test_loading_a_state_in_another_momentum_format_is_refused_and_changes_nothing():
    model = _model()
    opt = blockopt.AdamMini(model, rules="official", lr=1e-2)
    _steps([(model, opt)], 2)
    fp32_state = opt.state_dict()
    other = blockopt.AdamMini(model, rules="official", lr=1e-2, momentum_dtype="int8")
    _steps([(model, other)], 1)
    before = copy.deepcopy(other.state_dict())
    with pytest.raises(ValueError, match=r"holds its first moment as torch.float32, but this optimizer stores it as"):
        other.load_state_dict(fp32_state)
    after = other.state_dict()
    for k, s in before["state"].items():
        for name, t in s.items():
            assert torch.equal(t, after["state"][k][name])
    with pytest.raises(ValueError, match="holds its first moment as int8"):
        opt.load_state_dict(before)


@pytest.mark.parametrize("bad", ["int4", torch.float16, 8, "fp8"])
def test_bad_momentum_dtype_names_the_argument(bad):
    with pytest.raises(ValueError, match=r"Invalid momentum_dtype: .*expected None \(fp32\), torch.bfloat16 or 'int8'"):
        blockopt.AdamMini(_model(), momentum_dtype=bad)


def test_compact_momentum_with_a_low_precision_state_dtype_is_refused():
    with pytest.raises(ValueError, match="Invalid momentum_dtype=.*with state_dtype"):
        blockopt.AdamMini(_model(), momentum_dtype="int8", state_dtype=torch.bfloat16)


def test_compact_momentum_trains_like_fp32_on_a_short_run():
    """A sanity check on real gradients (the tinyshakespeare comparison is a benchmark)."""
    from conftest import token_batches, train

    losses = {}
    for fmt in (None, torch.bfloat16, "int8"):
        model = build_model("llama-tiny", vocab_size=64, n_layers=2, d_model=64)
        opt = blockopt.AdamMini(model, rules="official", lr=3e-3, momentum_dtype=fmt)
        losses[fmt] = train(model, opt, token_batches(64, 40))
    base = sum(losses[None][-5:]) / 5
    for fmt in (torch.bfloat16, "int8"):
        last = sum(losses[fmt][-5:]) / 5
        assert math.isfinite(last) and abs(last - base) / base < 0.02, (fmt, last, base)
