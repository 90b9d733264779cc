"""Step in backward: each tensor is stepped as soon as its gradient is complete, and its gradient freed.

``blockopt.step_in_backward(opt)`` registers a ``register_post_accumulate_grad_hook`` on every
parameter of an :class:`~blockopt.AdamMini`. When backward has finished accumulating a tensor's
gradient (on the last of ``accumulation_steps`` micro-batches), the hook steps that tensor alone,
with the same prepared step (route, kernel, state) that ``opt.step()`` would use for it, and sets its
``.grad`` to ``None``. So the gradients of the whole model never exist at once: at most one
tensor's, plus those backward is still accumulating.

``opt.step()`` keeps its place in the training loop and does nothing while the hooks are on (the
tensors were stepped in backward); LR schedulers change ``group["lr"]`` between steps as usual, and
the next backward reads it.

Clipping. A global gradient norm needs every gradient before any step, which this mode never
holds; ``clip="global"`` is refused. Two choices work in one pass:

* ``clip="per_tensor"``: each tensor's gradient is scaled to norm at most ``max_norm`` (exact: a
  normal loop with per-tensor clipping gives the same step).
* ``clip="previous"``: every gradient is scaled by ``min(1, max_norm / n)``, with ``n`` the global
  norm of the previous step's gradients (measured in passing); the first step is not clipped. Not
  exact: an approximation of global-norm clipping that lags one step.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .adam_mini import AdamMini
from .adam_mini_layouts import check_dense

__all__ = ["BackwardStep", "step_in_backward"]

CLIPS = (None, "per_tensor", "previous")


class BackwardStep:
    """The hooks of :func:`step_in_backward` on one optimizer; :meth:`remove` takes them off."""

    def __init__(self, opt: Any, *, accumulation_steps: int = 1, clip: str | None = None,
                 max_norm: float | None = None) -> None:
        _check(opt, accumulation_steps, clip, max_norm)
        self.opt = opt
        self.accumulation_steps = accumulation_steps
        self.clip = clip
        self.max_norm = max_norm
        # the global norm of the last completed step's gradients, before clipping (clip="previous" uses it)
        self.previous_norm: float | None = None
        self._sq = 0.0  # sum of squared gradient norms of the step in progress
        self._stepped = False  # a tensor was stepped since the last opt.step()
        self._count: dict[int, int] = {}
        self._where = {id(p): group for group in opt.param_groups for p in group["params"]}
        self._handles = [p.register_post_accumulate_grad_hook(self._hook)
                         for group in opt.param_groups for p in group["params"] if p.requires_grad]
        opt._backward = self

    def remove(self) -> None:
        """Take the hooks off: ``opt.step()`` steps the whole optimizer again."""
        for h in self._handles:
            h.remove()
        self._handles = []
        if getattr(self.opt, "_backward", None) is self:
            self.opt._backward = None

    def on_step(self, closure: Any) -> None:
        """``opt.step()`` while the hooks are on: the tensors were stepped in backward."""
        if closure is not None:
            raise ValueError("AdamMini.step(closure): a closure cannot be used with step_in_backward (the "
                             "tensors are stepped inside backward); call loss.backward() yourself and then "
                             "opt.step(), or remove the hooks (handle.remove())")
        if self._stepped:  # a step completed: its global norm is known (clip="previous" uses it next)
            self.previous_norm = math.sqrt(self._sq)
            self._sq = 0.0
            self._stepped = False

    @torch.no_grad()
    def _hook(self, p: torch.Tensor) -> None:
        n = self._count.get(id(p), 0) + 1
        self._count[id(p)] = n
        if n % self.accumulation_steps:
            return  # not the last micro-batch: backward keeps accumulating into p.grad
        g = p.grad
        if g.layout is not torch.strided:
            check_dense(g, p)
        sq = float(g.detach().float().pow(2).sum())  # every step's global norm, as clip_grad_norm_ returns it
        self._sq += sq
        scale = 1.0
        if self.clip == "per_tensor":
            scale = min(1.0, self.max_norm / (math.sqrt(sq) + 1e-6))
        elif self.clip == "previous" and self.previous_norm is not None:
            scale = min(1.0, self.max_norm / (self.previous_norm + 1e-6))
        if scale < 1.0:
            g.mul_(scale)
        step_one(self.opt, self._where[id(p)], p)
        self._stepped = True
        p.grad = None


def step_in_backward(opt: Any, *, accumulation_steps: int = 1, clip: str | None = None,
                     max_norm: float | None = None) -> BackwardStep:
    """Step ``opt``'s tensors inside backward, one by one, freeing each gradient; see the module doc.

    Returns the handle; ``handle.remove()`` goes back to stepping in ``opt.step()``.
    """
    return BackwardStep(opt, accumulation_steps=accumulation_steps, clip=clip, max_norm=max_norm)


def step_one(opt: AdamMini, group: dict[str, Any], p: torch.Tensor) -> None:
    """Step one tensor of ``group`` with its gradient, through the prepared step ``opt.step()`` uses
    (built once per tensor and kept in the optimizer's cache)."""
    opt._run_prepared(group, opt._prepared(group, [p], slot=("backward", id(p))), [p.grad])


def _check(opt: Any, accumulation_steps: int, clip: str | None, max_norm: float | None) -> None:
    if not isinstance(opt, AdamMini):
        raise TypeError(f"step_in_backward(opt): opt must be a blockopt.AdamMini, got {type(opt).__name__}")
    if getattr(opt, "_backward", None) is not None:
        raise ValueError("step_in_backward(opt): this optimizer already steps in backward; call remove() on "
                         "the first handle before making another")
    if isinstance(accumulation_steps, bool) or not isinstance(accumulation_steps, int) or accumulation_steps < 1:
        raise ValueError(f"Invalid accumulation_steps: {accumulation_steps!r}; allowed: an int >= 1")
    if clip == "global":
        raise ValueError("Invalid clip: 'global'; clipping by the global gradient norm needs every gradient "
                         "before the first step, and step_in_backward never holds them all. Allowed: "
                         "'per_tensor' (exact per-tensor clipping) or 'previous' (the previous step's global "
                         "norm; approximate)")
    if clip not in CLIPS:
        raise ValueError(f"Invalid clip: {clip!r}; allowed: None, 'per_tensor', 'previous'")
    if clip is not None and (isinstance(max_norm, bool) or not isinstance(max_norm, (int, float))
                             or not math.isfinite(max_norm) or max_norm <= 0):
        raise ValueError(f"Invalid max_norm: {max_norm!r}; clip={clip!r} needs a finite number > 0")
    if clip is None and max_norm is not None:
        raise ValueError(f"Invalid max_norm: {max_norm!r} without clip; pass clip='per_tensor' or 'previous'")
    if opt._zero or opt._dtensors:
        raise ValueError("step_in_backward(opt): sharded parameters (FSDP2 DTensors, DeepSpeed ZeRO) are not "
                         "supported; their gradients are reduced across ranks after backward")
    if opt._calib is not None:
        raise ValueError("step_in_backward(opt): an optimizer with calibrate=N is not supported (the switch "
                         "runs after a whole step); calibrate offline (blockopt.calibrate) and pass snr=")
    if any(group["capturable"] for group in opt.param_groups):
        raise ValueError("step_in_backward(opt): capturable=True is not supported (a CUDA graph replays the "
                         "whole step)")
