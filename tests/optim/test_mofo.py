"""MoFO against a plain-loop reference of the authors' semantics, AdamW and AdamMini."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from conftest import TOL, max_rel_diff, token_batches, train
from torch import nn

import blockopt
from blockopt.bench.models import build_model


def tiny(style="llama", **kw):
    name = "llama-tiny" if style == "llama" else "gpt2-tiny"
    kw.setdefault("n_layers", 1)
    kw.setdefault("d_model", 64)
    return build_model(name, vocab_size=64, **kw)


def random_grads(model: nn.Module, steps: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{n: torch.randn(p.shape, generator=g, dtype=p.dtype) for n, p in model.named_parameters()}
            for _ in range(steps)]


def run(model: nn.Module, opt: torch.optim.Optimizer, grads: list[dict[str, torch.Tensor]]) -> None:
    for step in grads:
        for n, p in model.named_parameters():
            p.grad = step[n].clone()
        opt.step()


# --- the reference: written from the description, shares no code with blockopt ------------------
def block_ids(shape: tuple[int, ...], axis: int, segments) -> torch.Tensor:
    """Block id of every element, by index arithmetic."""
    numel = math.prod(shape)
    if axis == -1:
        ((_, unit),) = segments
        return torch.arange(numel) // unit
    along, first = [], 0
    for size, unit in segments:
        along.extend(first + i // unit for i in range(size))
        first += size // unit
    idx = torch.tensor(along)
    view = [1] * len(shape)
    view[axis] = shape[axis]
    return idx.reshape(view).expand(shape).reshape(-1)


def reference_mofo(weights, grads, *, lr, betas, eps, wd, fraction, exempt, decay, blocks=None):
    """Float64 loop over entries' vectors: Adam moments for all, Adam's update on the top-|m| share."""
    b1, b2 = betas
    w = {n: x.detach().double().reshape(-1).clone() for n, x in weights.items()}
    m = {n: torch.zeros_like(x) for n, x in w.items()}
    nb = {n: (int(blocks[n].max()) + 1 if blocks else x.numel()) for n, x in w.items()}
    v = {n: torch.zeros(nb[n], dtype=torch.float64) for n in w}
    for t, step in enumerate(grads, start=1):
        for n in list(w):
            g = step[n].double().reshape(-1)
            if decay[n]:
                w[n] = w[n] * (1 - lr * wd)
            m[n] = b1 * m[n] + (1 - b1) * g
            if blocks:
                ids = blocks[n]
                mean_sq = torch.zeros(nb[n], dtype=torch.float64).index_add(0, ids, g * g) / torch.bincount(ids)
                v[n] = b2 * v[n] + (1 - b2) * mean_sq
                v_el = v[n][ids]
            else:
                v[n] = b2 * v[n] + (1 - b2) * g * g
                v_el = v[n]
            upd = (m[n] / (1 - b1**t)) / ((v_el / (1 - b2**t)).sqrt() + eps)
            if exempt[n]:
                chosen = torch.ones_like(g, dtype=torch.bool)
            else:
                k = max(1, int(fraction * g.numel()))
                chosen = torch.zeros_like(g, dtype=torch.bool)
                chosen[torch.argsort(m[n].abs(), descending=True)[:k]] = True
            w[n] = torch.where(chosen, w[n] - lr * upd, w[n])
    return {n: x.reshape(weights[n].shape) for n, x in w.items()}


def expected_exempt(model: nn.Module) -> dict[str, bool]:
    # what the authors exempt by name (norms, biases); in these models exactly the 1-D tensors
    return {n: ("norm" in n or n.endswith("bias") or n.split(".")[-2].startswith("ln")) for n, _ in model.named_parameters()}


@pytest.mark.parametrize("style", ["llama", "gpt2"])
@pytest.mark.parametrize("second_moment", ["element", "block"])
def test_equals_plain_reference(style, second_moment):
    model = tiny(style).double()
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    kw = {"lr": 3e-3, "betas": (0.9, 0.95), "eps": 1e-8}
    opt = blockopt.MoFO(model, weight_decay=0.1, fraction=0.1, second_moment=second_moment, **kw)
    grads = random_grads(model, 6)
    run(model, opt, grads)
    exempt = expected_exempt(model)
    assert exempt == {n: p.dim() == 1 for n, p in model.named_parameters()}
    decay = {n: p.dim() >= 2 for n, p in model.named_parameters()}
    blocks = None
    if second_moment == "block":
        blocks = {e.name: block_ids(e.shape, *e.geometry) for e in opt.plan.entries}
        q = next(n for n in blocks if "q_proj" in n or "c_attn" in n)
        assert len(blocks[q].unique()) < math.prod(start[q].shape)  # real blocks, not elements
    want = reference_mofo(start, grads, wd=0.1, fraction=0.1, exempt=exempt, decay=decay, blocks=blocks, **kw)
    for n, p in model.named_parameters():
        assert (p - want[n]).abs().max().item() <= 1e-6, n
        assert max_rel_diff(p, want[n]) <= 1e-10, n


def test_fraction_one_equals_adamw():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.LayerNorm(32), nn.Linear(32, 8))
    ref = copy.deepcopy(model)
    opt = blockopt.MoFO(model.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, fraction=1.0)
    adamw = torch.optim.AdamW(ref.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, foreach=False)
    g = torch.Generator().manual_seed(3)
    for _ in range(20):
        x = torch.randn(8, 16, generator=g)
        for m, o in ((model, opt), (ref, adamw)):
            o.zero_grad()
            m(x).square().mean().backward()
            o.step()
    for p, q in zip(model.parameters(), ref.parameters()):
        assert max_rel_diff(p, q) <= TOL[torch.float32]
        assert max_rel_diff(opt.state[p]["exp_avg_sq"], adamw.state[q]["exp_avg_sq"]) <= TOL[torch.float32]


def test_block_fraction_one_equals_adam_mini():
    model = tiny().double()
    ref = copy.deepcopy(model)
    kw = {"lr": 2e-3, "betas": (0.9, 0.95), "weight_decay": 0.1}
    opt = blockopt.MoFO(model, fraction=1.0, second_moment="block", **kw)
    mini = blockopt.AdamMini(ref, rules="official", foreach=False, **kw)
    batches = token_batches(64, 5)
    train(model, opt, batches)
    train(ref, mini, batches)
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        assert max_rel_diff(p, q) <= TOL[torch.float64], n
        assert max_rel_diff(opt.state[p]["block_exp_avg_sq"], mini.state[q]["block_exp_avg_sq"]) <= TOL[torch.float64]


@pytest.mark.parametrize("fraction", [0.05, 0.1, 0.37])
@pytest.mark.parametrize("second_moment", ["element", "block"])
def test_moves_expected_count(fraction, second_moment):
    model = tiny("gpt2")
    opt = blockopt.MoFO(model, lr=1e-3, fraction=fraction, second_moment=second_moment)  # no decay
    for step in random_grads(model, 3, seed=5):
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        run(model, opt, [step])
        for n, p in model.named_parameters():
            moved = int((p != before[n]).sum())
            if p.dim() == 1:  # norms and biases: the full update
                assert opt.exempt(p) and moved == p.numel(), n
            else:
                assert not opt.exempt(p)
                assert moved == max(1, int(fraction * p.numel())), n
                # and they are the ones with the largest |m|
                m = opt.state[p]["exp_avg"].abs()
                assert m[p != before[n]].min() >= m[p == before[n]].max(), n


def test_tiny_tensor_moves_at_least_one_entry():
    w = nn.Parameter(torch.ones(3, 3))
    opt = blockopt.MoFO([w], lr=0.1, fraction=0.05)  # int(0.05 * 9) == 0
    w.grad = torch.arange(9.0).reshape(3, 3)
    opt.step()
    assert int((w != 1).sum()) == 1 and w[2, 2] != 1


def test_ties_at_the_threshold_all_move():
    w = nn.Parameter(torch.zeros(4, 5))
    opt = blockopt.MoFO([w], lr=0.1, fraction=0.1)  # k = 2, but every |m| is equal
    w.grad = torch.ones(4, 5)
    opt.step()
    assert bool((w != 0).all())  # as in the authors' release: |m| >= k-th largest


def test_weight_decay_shrinks_unmoved_entries():
    w = nn.Parameter(torch.ones(10, 10))
    opt = blockopt.MoFO([w], lr=0.1, weight_decay=0.5, fraction=0.1)
    w.grad = torch.randn(10, 10, generator=torch.Generator().manual_seed(0))
    opt.step()
    assert int((w == 0.95).sum()) == 90  # decayed, not moved (the authors' release does the same)


def test_scheduler_closure_maximize_and_groups():
    torch.manual_seed(1)
    a, b = nn.Parameter(torch.randn(8, 8)), nn.Parameter(torch.randn(8, 8))
    opt = blockopt.MoFO([{"params": [a]}, {"params": [b], "fraction": 1.0, "lr": 0.5}], lr=1.0, fraction=0.25)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.1)
    closure_calls = []

    def closure():
        closure_calls.append(1)
        opt.zero_grad()
        loss = (a.pow(3).sum() + b.square().sum())
        loss.backward()
        return loss

    before_a, before_b = a.detach().clone(), b.detach().clone()
    loss = opt.step(closure)
    sched.step()
    assert closure_calls and isinstance(loss, torch.Tensor)
    assert int((a != before_a).sum()) == 16 and int((b != before_b).sum()) == 64
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1) and opt.param_groups[1]["lr"] == pytest.approx(0.05)
    # maximize with g equals minimize with -g
    x, y = nn.Parameter(torch.ones(4, 4)), nn.Parameter(torch.ones(4, 4))
    g = torch.randn(4, 4, generator=torch.Generator().manual_seed(2))
    ox, oy = blockopt.MoFO([x], lr=0.1, maximize=True), blockopt.MoFO([y], lr=0.1)
    x.grad, y.grad = g.clone(), -g
    ox.step()
    oy.step()
    assert torch.equal(x, y)


def test_low_precision_parameters_keep_fp32_state():
    model = tiny().to(torch.bfloat16)
    opt = blockopt.MoFO(model, lr=1e-3, second_moment="block")
    train(model, opt, token_batches(64, 2))
    p = model.embed.weight
    assert opt.state[p]["exp_avg"].dtype == torch.float32 and p.dtype == torch.bfloat16


@pytest.mark.parametrize("bad", [0, 0.0, 1.5, -0.1, "a", None, True, float("nan")])
def test_bad_fraction(bad):
    with pytest.raises(ValueError, match=r"Invalid fraction: .*expected a float in \(0, 1\]"):
        blockopt.MoFO(tiny(), fraction=bad)


def test_bad_input():
    model = tiny()
    with pytest.raises(ValueError, match="Invalid lr: -0.1"):
        blockopt.MoFO(model, lr=-0.1)
    with pytest.raises(ValueError, match="Invalid second_moment: 'row'"):
        blockopt.MoFO(model, second_moment="row")
    with pytest.raises(ValueError, match="needs each parameter's blocks"):
        blockopt.MoFO(model.parameters(), second_moment="block")
    with pytest.raises(ValueError, match="by name"):
        blockopt.MoFO(model.parameters(), plan=blockopt.partition(model))
    with pytest.raises(ValueError, match="partition hints"):
        blockopt.MoFO(model.parameters(), num_heads=4)
    opt = blockopt.MoFO(model.named_parameters(), plan=blockopt.partition(model), second_moment="block")
    extra = nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="Invalid fraction: 2"):
        opt.add_param_group({"params": [("extra", extra)], "fraction": 2})
    assert len(opt.param_groups) == 1  # nothing was added


@pytest.mark.parametrize("second_moment", ["element", "block"])
def test_state_dict_round_trip(second_moment):
    model = tiny()
    opt = blockopt.MoFO(model, lr=3e-3, weight_decay=0.1, fraction=0.2, second_moment=second_moment)
    batches = token_batches(64, 6, seed=4)
    train(model, opt, batches[:3])
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    other = tiny()
    other.load_state_dict(saved["model"])
    fresh = blockopt.MoFO(other, lr=1.0, fraction=0.5, second_moment=second_moment)
    fresh.load_state_dict(saved["opt"])
    assert fresh.param_groups[0]["fraction"] == 0.2 and fresh.param_groups[0]["lr"] == 3e-3
    train(model, opt, batches[3:])
    train(other, fresh, batches[3:])
    for (n, p), q in zip(model.named_parameters(), other.parameters()):
        assert torch.equal(p, q), n
    wrong = blockopt.MoFO(tiny(), second_moment="block" if second_moment == "element" else "element")
    with pytest.raises(ValueError, match="second_moment"):
        wrong.load_state_dict(saved["opt"])
    # a copy (deepcopy/pickle) keeps the decisions
    clone = copy.deepcopy(opt)
    assert clone.second_moment == second_moment and len(clone._info) == len(list(model.parameters()))
