"""Shared test helpers. Tolerances live here, in one place."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    # run Triton kernels through the interpreter on CPU tensors (set before triton is imported)
    os.environ.setdefault("TRITON_INTERPRET", "1")

TOL = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 4e-2}

#: test files whose tests are independent and slow (the Triton interpreter), with no module-scoped
#: fixtures: under pytest-xdist (``-n auto --dist loadgroup``) their tests spread over the workers.
#: Every other file stays on one worker, so its module-scoped fixtures run once.
SPREAD_OVER_WORKERS = {"tests/kernels/test_triton_step.py"}


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the groups
def pytest_collection_modifyitems(config, items) -> None:
    for item in items:
        path = item.nodeid.split("::", 1)[0]
        if path not in SPREAD_OVER_WORKERS:
            item.add_marker(pytest.mark.xdist_group(path))


def step_through_triton(opt, monkeypatch) -> None:
    """``opt.step()`` with every tensor the Triton kernel supports sent to the Triton route (the
    interpreter on CPU), the others where the dispatcher sends them."""
    from blockopt.kernels import dispatch
    from blockopt.kernels import momentum as mom
    from blockopt.kernels.adam_mini_triton import triton_supports

    original = dispatch.choose_route
    with monkeypatch.context() as mp:
        mp.setattr(dispatch, "choose_route", lambda p, g, m, v, geometry, **kw: (
            dispatch.Route("triton", mom.codec_for(kw.get("momentum", "fp32"))) if triton_supports(p, m, geometry)
            else original(p, g, m, v, geometry, **kw)))
        opt.step()


def max_rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (0 when both are zero)."""
    a, b = a.detach().double().reshape(-1), b.detach().double().reshape(-1)
    scale = b.abs().max().item()
    diff = (a - b).abs().max().item()
    return diff / scale if scale > 0 else diff


def token_batches(vocab: int, n: int, *, batch: int = 4, seq: int = 32, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (batch, seq), generator=g) for _ in range(n)]


def train(model, opt, batches) -> list[float]:
    losses = []
    for x in batches:
        opt.zero_grad()
        loss = model(x, x)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def text_batches(text: bytes, n: int, *, batch: int = 4, seq: int = 32, seed: int = 0):
    """``n`` (input, target) byte batches of real text: random windows of ``text``, target shifted by one."""
    data = torch.tensor(list(text))
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        i = torch.randint(0, len(data) - seq - 1, (batch,), generator=g)
        x = torch.stack([data[j:j + seq + 1] for j in i.tolist()])
        out.append((x[:, :-1], x[:, 1:]))
    return out


class TinyExperts(torch.nn.Module):
    """Stacked experts like transformers 5 stores them: ``[E, out, in]``, or ``[E, in, out]`` with
    ``is_transposed`` (and expert biases ``[E, out]``). Every expert runs on every token, weighted."""

    def __init__(self, e: int, hidden: int, inter: int, transposed: bool, bias: bool, gen: torch.Generator) -> None:
        super().__init__()
        self.num_experts, self.is_transposed = e, transposed
        up, down = ((e, hidden, 2 * inter), (e, inter, hidden)) if transposed else ((e, 2 * inter, hidden), (e, hidden, inter))
        self.gate_up_proj = torch.nn.Parameter(torch.randn(up, generator=gen) * 0.3)
        self.down_proj = torch.nn.Parameter(torch.randn(down, generator=gen) * 0.3)
        if bias:
            self.gate_up_proj_bias = torch.nn.Parameter(torch.randn(e, 2 * inter, generator=gen) * 0.1)
            self.down_proj_bias = torch.nn.Parameter(torch.randn(e, hidden, generator=gen) * 0.1)

    def forward(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:  # x [N, hidden], weights [N, E]
        t = self.is_transposed
        h = torch.einsum("nh,ehi->nei" if t else "nh,eih->nei", x, self.gate_up_proj)
        if hasattr(self, "gate_up_proj_bias"):
            h = h + self.gate_up_proj_bias
        a, b = h.chunk(2, dim=-1)
        h = torch.nn.functional.silu(a) * b
        out = torch.einsum("nei,eih->neh" if t else "nei,ehi->neh", h, self.down_proj)
        if hasattr(self, "down_proj_bias"):
            out = out + self.down_proj_bias
        return torch.einsum("ne,neh->nh", weights, out).clone()  # not a view (FSDP2 hooks its outputs)


class TopKRouter(torch.nn.Module):
    def __init__(self, e: int, hidden: int, gen: torch.Generator) -> None:
        super().__init__()
        self.num_experts = e
        self.weight = torch.nn.Parameter(torch.randn(e, hidden, generator=gen) * 0.3)


class TinyMoE(torch.nn.Module):
    """A token model with a router and two stacked-expert layers (both layouts); 5 experts, so that
    three ranks hold 2, 2 and 1 of them. ``model(x)`` gives logits; ``model(x, y)`` the loss."""

    def __init__(self, vocab: int = 11, hidden: int = 8, inter: int = 4, e: int = 5, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.embed = torch.nn.Embedding(vocab, hidden)
        with torch.no_grad():
            self.embed.weight.copy_(torch.randn(vocab, hidden, generator=gen))
        self.router = TopKRouter(e, hidden, gen)
        self.experts = TinyExperts(e, hidden, inter, False, False, gen)
        self.experts_t = TinyExperts(e, hidden, inter, True, True, gen)
        self.head = torch.nn.Linear(hidden, vocab)
        with torch.no_grad():
            self.head.weight.copy_(torch.randn(vocab, hidden, generator=gen) * 0.3)
            self.head.bias.zero_()

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        h = self.embed(x).reshape(-1, self.embed.embedding_dim)
        w = torch.softmax(h @ self.router.weight.t(), dim=-1)
        h = h + self.experts(h, w)
        h = h + self.experts_t(h, w)
        logits = self.head(h).reshape(*x.shape, -1)
        if y is None:
            return logits
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
