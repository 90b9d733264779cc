"""Candidates for AdamMini's default: plans that keep the optimizer state at or under 0.55x of AdamW's
at every step, measured with `blockopt bench` (issue: half the memory at every step).

This wrapper registers, in this process only (use `--isolate none`), Adam-mini variants that the
`--optimizers name:key=value` syntax cannot express:

  mini-builtin        the built-in SNR table (`partition(model, snr="builtin")`) from step 1
  mini-builtin-emb    the same, with the (tied) embedding one value per element
  mini-group16        every matrix in runs of 16 consecutive elements (1/16 of a value per weight),
                      norms and biases per element
  mini-group32-emb    runs of 32, with the embedding per element (runs of 16 with it would be 0.5506x)
  mini-warm           runs of 16 for the first 20 % of the steps, then the built-in table; each new
                      block's value is the mean of the runs it covers
  mini-budget         AdamMini(model, rules="builtin", state_budget=0.55)
  mini-budget-clip    the same plan, each element's normalised update m_hat / (sqrt(v_hat) + eps)
                      clipped to [-1, 1] (a plain loop here; a block's mean hides its largest
                      elements, which then take steps Adam never takes)

Each is at or under 0.55x of fp32 AdamW's state from the first step (the bench records the peak).

    python benchmarks/default_variants.py bench --optimizers adamw,mini-builtin,... --lrs 3e-3 \
        --seeds 0,1,2 --steps 300 --isolate none --threads 1 --no-plots --out runs/dv
"""

from __future__ import annotations

import sys
from dataclasses import replace

import torch

from blockopt.bench import optimizers as O
from blockopt.cli import main
from blockopt.kernels.adam_mini import _element_block_ids
from blockopt.kernels.blocks import Geometry, block_sizes
from blockopt.optim import AdamMini
from blockopt.optim.calibration import compress_to_blocks
from blockopt.partition import partition

UNIT = 16


def _embedding_per_element(plan):
    new = {e.name: replace(e, geometry=Geometry(-1, ((e.numel, 1),)), parts=(), rule="variant: per element")
           for e in plan.entries if e.role == "embedding"}
    return plan.replace_entries(new)


def builtin_plan(model, embedding_element=False):
    plan = partition(model, warn=False, snr="builtin")
    return _embedding_per_element(plan) if embedding_element else plan


def group_plan(model, embedding_element=False, unit=UNIT):
    plan = partition(model, warn=False)
    new = {}
    for e in plan.entries:
        if len(e.shape) < 2:  # norms, biases: per element (a few hundred values)
            new[e.name] = replace(e, geometry=Geometry(-1, ((e.numel, 1),)), parts=(), rule="variant: per element")
        elif e.numel % unit == 0:
            new[e.name] = replace(e, geometry=Geometry(-1, ((e.numel, unit),)), parts=(),
                                  rule=f"variant: runs of {unit}")
    plan = plan.replace_entries(new)
    return _embedding_per_element(plan) if embedding_element else plan


class WarmSwitch(AdamMini):
    """Runs of 16 for the first ``switch_at`` steps, then ``final``; block values carried over as means."""

    def __init__(self, model, *, final, switch_at, **kw):
        super().__init__(model, plan=group_plan(model), **kw)
        self.final, self.switch_at, self.done = final, switch_at, 0

    @torch.no_grad()
    def step(self, closure=None):
        loss = super().step(closure)
        self.done += 1
        if self.done == self.switch_at:
            new_v = {}
            for group in self.param_groups:
                for name, p in zip(group["param_names"], group["params"]):
                    old, target = self.plan[name], self.final[name]
                    if target.geometry == old.geometry or p not in self.state:
                        continue
                    v = self.state[p]["block_exp_avg_sq"]
                    unit = old.geometry.segments[0][1]
                    per_element = v.repeat_interleave(unit)  # each run's value for its elements
                    new_v[p] = compress_to_blocks(per_element, old.shape, target.geometry)
            self.set_plan(self.final, new_v)
        return loss


class ClippedMini(torch.optim.Optimizer):
    """Adam-mini on ``plan`` with each element's normalised update clipped to [-clip, clip]."""

    def __init__(self, model, plan, *, lr, betas, eps, weight_decay, clip):
        named = list(model.named_parameters())
        super().__init__([{"params": [p for _, p in named], "names": [n for n, _ in named]}],
                         {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay, "clip": clip})
        self.plan = plan

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for name, p in zip(group["names"], group["params"]):
                if p.grad is None:
                    continue
                e, st = self.plan[name], self.state[p]
                if not st:
                    ids = _element_block_ids(tuple(p.shape), e.geometry).reshape(-1)
                    st.update(step=0, m=torch.zeros_like(p), v=torch.zeros(e.num_blocks), ids=ids,
                              n=torch.tensor(block_sizes(tuple(p.shape), e.geometry), dtype=torch.float32))
                st["step"] += 1
                t, g = st["step"], p.grad
                mean_sq = torch.zeros(e.num_blocks).index_add_(0, st["ids"], (g * g).reshape(-1)) / st["n"]
                if e.weight_decay and group["weight_decay"]:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                st["m"].lerp_(g, 1 - b1)
                st["v"].mul_(b2).add_(mean_sq, alpha=1 - b2)
                denom = (st["v"] / (1 - b2**t)).sqrt().add_(group["eps"])[st["ids"]].reshape(p.shape)
                update = (st["m"] / (1 - b1**t)).div_(denom).clamp_(-group["clip"], group["clip"])
                p.add_(update, alpha=-group["lr"])


class FactoredMini(torch.optim.Optimizer):
    """Adam's m per element; v per ``plan`` block, except that the 2-D tensors named in ``factored``
    keep a row and a column EMA of g^2 and use their rank-1 product (Adafactor's estimate,
    v_ij = R_i C_j / mean(R)): r + c values per matrix."""

    def __init__(self, model, plan, factored, *, lr, betas, eps, weight_decay):
        named = list(model.named_parameters())
        super().__init__([{"params": [p for _, p in named], "names": [n for n, _ in named]}],
                         {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})
        self.plan, self.factored = plan, set(factored)

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for name, p in zip(group["names"], group["params"]):
                if p.grad is None:
                    continue
                e, st = self.plan[name], self.state[p]
                fact = name in self.factored
                if not st:
                    st.update(step=0, m=torch.zeros_like(p))
                    if fact:
                        st.update(r=torch.zeros(p.shape[0]), c=torch.zeros(p.shape[1]))
                    else:
                        ids = _element_block_ids(tuple(p.shape), e.geometry).reshape(-1)
                        st.update(v=torch.zeros(e.num_blocks), ids=ids,
                                  n=torch.tensor(block_sizes(tuple(p.shape), e.geometry), dtype=torch.float32))
                st["step"] += 1
                t, g = st["step"], p.grad
                g2 = g * g
                if e.weight_decay and group["weight_decay"]:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                st["m"].lerp_(g, 1 - b1)
                if fact:
                    st["r"].mul_(b2).add_(g2.mean(1), alpha=1 - b2)
                    st["c"].mul_(b2).add_(g2.mean(0), alpha=1 - b2)
                    v = torch.outer(st["r"], st["c"]).div_(st["r"].mean().clamp_min(1e-30))
                else:
                    mean_sq = torch.zeros(e.num_blocks).index_add_(0, st["ids"], g2.reshape(-1)) / st["n"]
                    st["v"].mul_(b2).add_(mean_sq, alpha=1 - b2)
                    v = st["v"][st["ids"]].reshape(p.shape)
                denom = (v / (1 - b2**t)).sqrt_().add_(group["eps"])
                p.addcdiv_(st["m"], denom, value=-group["lr"] / (1 - b1**t))


def _factored_plan(model, which):
    plan = partition(model, warn=False, snr="builtin", state_budget=0.55 if which != "all" else None)
    names = []
    for e in plan.entries:
        if len(e.shape) != 2 or e.role == "embedding":
            continue
        if which == "all" or e.num_blocks != e.numel:  # skip what the budget made per element
            names.append(e.name)
    if which == "all":
        plan = _embedding_per_element(plan)
    return plan, names


def _kw(hp, lr):
    return {"lr": lr, "betas": (hp.beta1, hp.beta2), "eps": hp.eps, "weight_decay": hp.weight_decay}


def _make(kind):
    def make(model, lr, hp, plan, info):
        if kind == "builtin":
            return AdamMini(model, plan=builtin_plan(model), **_kw(hp, lr))
        if kind == "builtin-emb":
            return AdamMini(model, plan=builtin_plan(model, embedding_element=True), **_kw(hp, lr))
        if kind == "group16":
            return AdamMini(model, plan=group_plan(model), **_kw(hp, lr))
        if kind == "group32-emb":
            return AdamMini(model, plan=group_plan(model, embedding_element=True, unit=32), **_kw(hp, lr))
        if kind == "warm":
            return WarmSwitch(model, final=builtin_plan(model), switch_at=max(1, round(0.2 * hp.run_steps)),
                              **_kw(hp, lr))
        if kind == "budget":
            return AdamMini(model, rules="builtin", state_budget=0.55, **_kw(hp, lr))
        if kind == "budget-clip":
            return ClippedMini(model, partition(model, warn=False, snr="builtin", state_budget=0.55), clip=1.0,
                               **_kw(hp, lr))
        if kind == "budget-loop":  # the plain loop with nothing factored: must match mini-budget
            return FactoredMini(model, partition(model, warn=False, snr="builtin", state_budget=0.55), (),
                                **_kw(hp, lr))
        if kind in ("factored", "factored-all"):
            plan, names = _factored_plan(model, "all" if kind == "factored-all" else "budget")
            return FactoredMini(model, plan, names, **_kw(hp, lr))
        raise ValueError(kind)
    return make


for _kind in ("builtin", "builtin-emb", "group16", "group32-emb", "warm", "budget", "budget-clip", "budget-loop", "factored",
              "factored-all"):
    _name = f"mini-{_kind}"
    O.REGISTRY[_name] = O.OptimizerSpec(_name, f"Adam-mini ({_kind})", _make(_kind), 3e-3,
                                        f"candidate default: {_kind} (benchmarks/default_variants.py)",
                                        options=O._ADAM_OPTS)

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
