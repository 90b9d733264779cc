"""Helpers and fixtures shared by the Hessian toolkit tests.

Test modules import them by name (``from hessian_helpers import one_thread, ...``): a
``conftest.py`` here would shadow ``tests/conftest.py``, which other tests import as ``conftest``.

Ground truth is ``torch.autograd.functional.hessian`` of the loss as a function of the
flattened parameters (through ``torch.func.functional_call``), in float64.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

#: float64 agreement with autograd's Hessian (the acceptance bound)
HVP_TOL = 1e-10


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny float64 products run fastest on one thread and do not suffer from busy cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def full_hessian(model: nn.Module, loss_fn, batch, names: list[str]) -> torch.Tensor:
    """Dense Hessian of ``loss_fn(model, batch)`` w.r.t. the named parameters (flattened, concatenated)."""
    params = dict(model.named_parameters())
    buffers = {k: b.clone() for k, b in model.named_buffers()}  # a training-mode forward updates them
    base = [params[n].detach().clone() for n in names]
    shapes = [p.shape for p in base]
    sizes = [p.numel() for p in base]

    def f(flat: torch.Tensor) -> torch.Tensor:
        chunks = flat.split(sizes)
        override = {n: c.view(s) for n, c, s in zip(names, chunks, shapes)}
        merged = {**{k: v.detach() for k, v in params.items()}, **override, **buffers}

        class _Call(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.inner = model

            def forward(self, *a, **k):
                return functional_call(model, merged, a, k)

        return loss_fn(_Call(), batch)

    flat = torch.cat([p.reshape(-1) for p in base])
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.MATH]):  # the fused CPU kernel has no double backward
        return torch.autograd.functional.hessian(f, flat)


def ce_loss(model: nn.Module, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


def tiny_mlp(seed: int = 0) -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 4), nn.Softplus(), nn.Linear(4, 3)).double()
    x = torch.randn(9, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (9,), generator=g)
    return net, (x, y)


class TinyConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.fc = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.tanh(self.conv(x)).mean((2, 3)))


def tiny_conv(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = TinyConv().double()
    x = torch.randn(4, 2, 5, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 2, (4,), generator=g)
    return net, (x, y)


def tiny_lm(seed: int = 0, *, d_model: int = 16, n_heads: int = 2, n_layers: int = 1, vocab: int = 32,
            batch: int = 3, seq: int = 6, d_ff: int = 32):
    """The library's Llama-style decoder (SDPA attention, RoPE, RMSNorm, SwiGLU), float64."""
    from blockopt.models import build_model

    model = build_model("llama-tiny", vocab_size=vocab, n_layers=n_layers, d_model=d_model, n_heads=n_heads,
                        n_kv_heads=n_heads, d_ff=d_ff, max_seq_len=64, seed=seed).double()
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randint(0, vocab, (batch, seq + 1), generator=g)
    return model, (x[:, :-1].contiguous(), x[:, 1:].contiguous())


def lm_loss(model, batch):
    """Cross-entropy from the logits in float64 (the model's ``forward(x, y)`` casts to float32)."""
    x, y = batch
    logits = model(x)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def known_spectrum(eigs: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """A dense symmetric matrix ``Q diag(eigs) Q^T`` with a random orthogonal ``Q`` (float64)."""
    g = torch.Generator().manual_seed(seed)
    n = eigs.numel()
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return (Q * eigs.to(torch.float64)) @ Q.T


class Quadratic(nn.Module):
    """``loss = sum_b 0.5 w_b^T A_b w_b``: a model whose Hessian is exactly ``blockdiag(A_b)``."""

    def __init__(self, mats: list[torch.Tensor], seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.mats = [m.to(torch.float64) for m in mats]
        self.w = nn.ParameterList(
            [nn.Parameter(torch.randn(int(m.shape[0] ** 0.5), int(m.shape[0] ** 0.5), generator=g,
                                      dtype=torch.float64)) for m in mats]
        )

    def forward(self, _batch=None) -> torch.Tensor:
        out = torch.zeros((), dtype=torch.float64)
        for w, A in zip(self.w, self.mats):
            v = w.reshape(-1)
            out = out + 0.5 * v @ (A @ v)
        return out


def quad_loss(model, batch):
    return model(batch)
