"""Shared test helpers. Tolerances live here, in one place (DESIGN.md)."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    # run Triton kernels through the interpreter on CPU tensors (set before triton is imported)
    os.environ.setdefault("TRITON_INTERPRET", "1")

TOL = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 4e-2}


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
