"""Optimizers the bench compares that are not Adam-mini: small, self-contained, plain loops.

* :class:`ChainedOptimizer`: several optimizers over disjoint parameters, stepped together
  (the bench's Muon on hidden matrices + AdamW on the rest).
* :class:`CautiousAdamW`: C-AdamW (Liang et al., 2024), a baseline.

Both are importable from :mod:`blockopt.bench.optimizers` too, where the bench's registry uses them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

__all__ = ["CautiousAdamW", "ChainedOptimizer"]


class ChainedOptimizer:
    """Several optimizers over disjoint parameters, stepped together (Muon + AdamW).

    ``param_groups`` is the concatenation of the children's groups (the same dicts,
    so a schedule that sets ``group["lr"]`` reaches them); ``state`` merges theirs.
    """

    def __init__(self, optimizers: Iterable[torch.optim.Optimizer]) -> None:
        self.optimizers = list(optimizers)

    @property
    def param_groups(self):
        return [g for o in self.optimizers for g in o.param_groups]

    @property
    def state(self):
        out = {}
        for o in self.optimizers:
            out.update(o.state)
        return out

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for o in self.optimizers:
            o.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"optimizers": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for o, sd in zip(self.optimizers, state_dict["optimizers"], strict=True):
            o.load_state_dict(sd)

    def __repr__(self) -> str:
        return "ChainedOptimizer(" + ", ".join(type(o).__name__ for o in self.optimizers) + ")"


class CautiousAdamW(torch.optim.Optimizer):
    """C-AdamW (Liang et al., 2024, "Cautious Optimizers"), a plain baseline for the bench.

    AdamW whose update is zeroed where its sign disagrees with the current gradient,
    the rest rescaled by ``numel / (kept + 1)`` (as in ``pytorch_optimizer``).
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                st = self.state[p]
                if not st:
                    st["step"] = torch.tensor(0.0)
                    st["exp_avg"] = torch.zeros_like(p)
                    st["exp_avg_sq"] = torch.zeros_like(p)
                st["step"] += 1
                t = st["step"].item()
                m, v = st["exp_avg"], st["exp_avg_sq"]
                m.lerp_(g, 1 - beta1)
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                denom = (v / (1 - beta2**t)).sqrt_().add_(group["eps"])
                update = (m / (1 - beta1**t)).div_(denom)
                mask = (update * g > 0).to(update.dtype)
                update.mul_(mask * (mask.numel() / (mask.sum() + 1)))
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(update, alpha=-group["lr"])
        return loss
