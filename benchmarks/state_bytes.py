"""Optimizer state bytes on GPT-2 small's shapes (gpt2-160m): AdamMini with fp32, bf16 and int8 momentum
against fp32 AdamW, from the plan's accounting and from measuring the state tensors after one step.

    python benchmarks/state_bytes.py
"""

from __future__ import annotations

import torch

import blockopt
from blockopt.models import build_model


def main() -> None:
    model = build_model("gpt2-160m", seed=None)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    adamw = torch.optim.AdamW(model.parameters(), fused=True)
    adamw.step()
    adamw_bytes = sum(t.nbytes for s in adamw.state.values() for k, t in s.items() if k != "step")
    del adamw
    print(f"gpt2-160m, {sum(p.numel() for p in model.parameters()):,} parameters; fp32 AdamW state {adamw_bytes:,} bytes")
    for label, md in (("fp32", None), ("bf16", torch.bfloat16), ("int8", "int8")):
        opt = blockopt.AdamMini(model, rules="official", momentum_dtype=md)
        opt.step()
        measured = sum(t.nbytes for s in opt.state.values() for k, t in s.items() if k != "step")
        planned = opt.plan.state_bytes(momentum_dtype=md)
        print(f"  AdamMini {label} momentum: measured {measured:,} bytes ({measured / adamw_bytes:.4f}x), "
              f"plan {planned:,} bytes ({planned / opt.plan.adamw_state_bytes():.4f}x)")
        del opt


if __name__ == "__main__":
    main()
