"""Hessian-vector products (``blockopt.hessian.hvp``): exactness against autograd's Hessian,
parameter subsets and slices, measurement modes, determinism, and the three bad inputs
(a subset matching nothing, a model without double backward, a batch too large)."""

from __future__ import annotations

import pytest
import torch
from conftest import max_rel_diff
from hessian_helpers import (  # noqa: F401 - fixture
    HVP_TOL,
    ce_loss,
    full_hessian,
    lm_loss,
    one_thread,
    tiny_conv,
    tiny_lm,
    tiny_mlp,
)
from torch import nn
from torch.autograd.function import once_differentiable

from blockopt.hessian import (
    BatchTooLargeError,
    DoubleBackwardError,
    HessianInputError,
    HessianOperator,
    estimate_hvp_memory,
    hvp,
    select_parameters,
)
from blockopt.hessian.hvp import MEMORY_HEADROOM


def _rand(n: int, seed: int = 3) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ---------------------------------------------------------------------------
# exactness


def _small_lm():
    """The decoder with a narrower MLP and vocabulary: its dense Hessian (one backward per parameter) is
    what this test pays for."""
    return tiny_lm(d_ff=16, vocab=16)


@pytest.mark.parametrize("build, loss", [(tiny_mlp, ce_loss), (tiny_conv, ce_loss), (_small_lm, lm_loss)],
                         ids=["mlp", "conv", "llama-decoder"])
def test_hvp_equals_autograd_hessian_times_vector(build, loss):
    model, batch = build()
    op = HessianOperator(model, batch, loss)
    H = full_hessian(model, loss, batch, op.names)
    assert H.shape == (op.numel, op.numel)
    for seed in (1, 2):
        v = _rand(op.numel, seed)
        assert max_rel_diff(op.matvec(v), H @ v) < HVP_TOL
    # the products are also exact per tensor (dict interface)
    vs = {n: _rand(op.numel, 5)[op.offsets[i]:op.offsets[i + 1]].view(op.shapes[i]) for i, n in enumerate(op.names)}
    out = op.hvp(vs)
    ref = H @ torch.cat([vs[n].reshape(-1) for n in op.names])
    assert max_rel_diff(torch.cat([out[n].reshape(-1) for n in op.names]), ref) < HVP_TOL


def test_subset_and_slice_are_the_submatrix():
    model, batch = tiny_lm()
    names = ["blocks.0.attn.q_proj.weight", "blocks.0.attn.k_proj.weight"]
    op = HessianOperator(model, batch, lm_loss, params=r"blocks\.0\.attn\.[qk]_proj\.weight")
    assert op.names == names
    H = full_hessian(model, lm_loss, batch, names)
    v = _rand(op.numel)
    assert max_rel_diff(op.matvec(v), H @ v) < HVP_TOL
    # one tensor of the subset: H_qq
    q = op.restrict(names[0])
    nq = q.numel
    assert max_rel_diff(q.matvec(v[:nq]), H[:nq, :nq] @ v[:nq]) < HVP_TOL
    # a slice of one tensor (its second head's rows): the sub-block of H_qq
    idx = torch.arange(8 * 16, 16 * 16)
    s = op.restrict(names[0], index=idx)
    w = _rand(idx.numel(), 4)
    assert max_rel_diff(s.matvec(w), H[idx][:, idx] @ w) < HVP_TOL
    # batched products (vmap over the double backward) equal one-at-a-time ones
    V = torch.stack([_rand(nq, k) for k in range(5)], 1)
    assert max_rel_diff(q.matmat(V, chunk=3), torch.stack([q.matvec(c) for c in V.T], 1)) < 1e-12


class _WithUnused(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.unused = nn.Linear(2, 2).double()  # never reaches the loss: zero Hessian rows

    def forward(self, x):
        return self.net(x)


def test_functional_hvp_and_unused_parameters():
    net, batch = tiny_mlp()
    model = _WithUnused(net)
    out = hvp(model, batch, {"net.0.weight": torch.ones(6, 5, dtype=torch.float64)}, ce_loss)
    assert set(out) == {n for n, _ in model.named_parameters()}
    assert torch.count_nonzero(out["unused.weight"]) == 0 and torch.count_nonzero(out["net.0.weight"]) > 0


def test_linear_loss_has_zero_hessian():
    w = nn.Parameter(torch.randn(4, dtype=torch.float64))
    m = nn.Module()
    m.w = w
    op = HessianOperator(m, torch.ones(4, dtype=torch.float64), lambda mod, b: (mod.w * b).sum())
    assert torch.count_nonzero(op.matvec(_rand(4))) == 0


# ---------------------------------------------------------------------------
# modes, randomness, determinism


class _DropBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 6)
        self.bn = nn.BatchNorm1d(6)
        self.drop = nn.Dropout(0.5)
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        return self.out(self.drop(torch.tanh(self.bn(self.fc(x)))))


def _drop_bn():
    g = torch.Generator().manual_seed(0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        m = _DropBN().double()
    x = torch.randn(10, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (10,), generator=g)
    return m, (x, y)


def test_measure_mode_no_dropout_batch_statistics_and_everything_restored():
    model, batch = _drop_bn()
    model.train()
    model.drop.eval()  # an unusual mix of modes, to check they are restored one by one
    flags = {n: m.training for n, m in model.named_modules()}
    buffers = {k: b.clone() for k, b in model.named_buffers()}
    rng = torch.get_rng_state()
    op = HessianOperator(model, batch, ce_loss)  # mode="measure"
    v = _rand(op.numel)
    hv = op.matvec(v)
    # the user's model is as it was: modes, running statistics, global RNG
    assert {n: m.training for n, m in model.named_modules()} == flags
    for k, b in model.named_buffers():
        assert torch.equal(b, buffers[k]), k
    assert torch.equal(torch.get_rng_state(), rng)
    # reference: dropout off, batch norm with batch statistics (training objective)
    ref = _drop_bn()[0]
    ref.load_state_dict(model.state_dict())
    ref.train()
    ref.drop.p = 0.0
    H = full_hessian(ref, ce_loss, batch, op.names)
    assert max_rel_diff(hv, H @ v) < HVP_TOL
    # eval mode: running statistics instead -> a different Hessian
    op_eval = HessianOperator(model, batch, ce_loss, mode="eval")
    ref.eval()
    H_eval = full_hessian(ref, ce_loss, batch, op_eval.names)
    assert max_rel_diff(op_eval.matvec(v), H_eval @ v) < HVP_TOL
    assert max_rel_diff(H_eval @ v, H @ v) > 1e-3


def test_train_mode_is_seeded_and_deterministic():
    model, batch = _drop_bn()
    model.train()
    v = _rand(sum(p.numel() for p in model.parameters()))
    a = HessianOperator(model, batch, ce_loss, mode="train", seed=7).matvec(v)
    b = HessianOperator(model, batch, ce_loss, mode="train", seed=7).matvec(v)
    c = HessianOperator(model, batch, ce_loss, mode="train", seed=8).matvec(v)
    assert torch.equal(a, b)  # same seed, same dropout masks
    assert not torch.allclose(a, c)  # dropout is really on in train mode
    m = HessianOperator(model, batch, ce_loss, seed=7).matvec(v)
    assert torch.equal(m, HessianOperator(model, batch, ce_loss, seed=123).matvec(v))  # measure: no randomness


# ---------------------------------------------------------------------------
# bad input


def test_parameter_subset_matching_nothing():
    model, batch = tiny_mlp()
    with pytest.raises(HessianInputError, match=r"pattern .*blocks.* matches no parameter .*'0\.weight'"):
        HessianOperator(model, batch, ce_loss, params=r"blocks\.9.*")
    with pytest.raises(HessianInputError, match="'nope' matches no parameter"):
        select_parameters(model, ["0.weight", "nope"])
    with pytest.raises(HessianInputError, match="not a parameter of the model"):
        select_parameters(model, [torch.zeros(3)])
    model[0].weight.requires_grad_(False)
    with pytest.raises(HessianInputError, match=r"\['0.weight'\] have requires_grad=False"):
        select_parameters(model, "0.weight")
    op = HessianOperator(model, batch, ce_loss)
    with pytest.raises(HessianInputError, match="matches none of the operator's parameters"):
        op.restrict("missing")
    with pytest.raises(HessianInputError, match="expected a flat vector of"):
        op.matvec(torch.zeros(3, dtype=torch.float64))


class _Square(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 2 * x * g


class _OnceNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 2).double()

    def forward(self, x):
        return _Square.apply(self.fc(x)).sum()


def test_double_backward_impossible_names_the_operation():
    net = _OnceNet()
    x = torch.randn(4, 3, dtype=torch.float64)
    # the loss is a plain sum of the function's output, so PyTorch itself would not even complain:
    # the gradient would silently be treated as constant. The operator refuses and names it.
    with pytest.raises(DoubleBackwardError, match=r"impossible through _Square \(custom autograd.Function\)") as e:
        HessianOperator(net, x, lambda m, b: m(b))
    assert e.value.operations[0].startswith("_Square")


def test_fused_attention_kernel_is_named():
    model, batch = tiny_lm()
    with pytest.raises(DoubleBackwardError, match=r"ScaledDotProductFlashAttentionForCpuBackward.*PyTorch says"):
        HessianOperator(model, batch, lm_loss, sdpa_math=False)
    HessianOperator(model, batch, lm_loss)  # the default (math SDPA backend) works


class _Counting(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.seen: list[int] = []

    def forward(self, x):
        self.seen.append(x.shape[0])
        return self.inner(x)


def test_batch_too_large_is_refused_before_starting():
    net, _ = tiny_mlp()
    model = _Counting(net)
    x = torch.randn(4096, 5, dtype=torch.float64)
    y = torch.zeros(4096, dtype=torch.long)
    est = estimate_hvp_memory(model, (x, y), ce_loss)
    assert est.batch_size == 4096 and est.per_example > 0
    assert est.total == est.fixed + 4096 * est.per_example
    budget = est.fixed + 100 * est.per_example
    fits = int((MEMORY_HEADROOM * budget - est.fixed) // est.per_example)
    assert 50 < fits < 100
    model.seen.clear()
    with pytest.raises(BatchTooLargeError, match=rf"4096 examples would need about .* at most {fits} examples"):
        HessianOperator(model, (x, y), ce_loss, max_memory=budget)
    assert model.seen and max(model.seen) <= 4  # only the 2- and 4-example probes ran
    small = (x[:80], y[:80])
    HessianOperator(model, small, ce_loss, max_memory=budget)  # fits


class _OnceOnOtherBranch(nn.Module):
    """The once-differentiable op only touches ``b``; the Hessian of ``a`` does not go through it."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 2).double()
        self.b = nn.Linear(3, 2).double()

    def forward(self, x):
        return torch.tanh(self.a(x)).pow(2).sum() + _Square.apply(self.b(x)).sum()


def test_once_differentiable_op_off_the_measured_path_is_fine():
    net = _OnceOnOtherBranch()
    x = torch.randn(4, 3, dtype=torch.float64)
    loss = lambda m, b: m(b)
    op = HessianOperator(net, x, loss, params=r"a\..*")
    H = full_hessian(net, loss, x, op.names)
    v = _rand(op.numel)
    assert max_rel_diff(op.matvec(v), H @ v) < HVP_TOL
    with pytest.raises(DoubleBackwardError, match="_Square"):
        HessianOperator(net, x, loss, params=r"b\..*")
