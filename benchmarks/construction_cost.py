"""Time to build AdamMini's default plan, the optimizer and its state for a 7B Llama configuration (meta
device; the state is what a first step allocates, on meta tensors, through the foreach step).

    python benchmarks/construction_cost.py
"""

from __future__ import annotations

import time

import torch

import blockopt


def main() -> None:
    from transformers import AutoModelForCausalLM, LlamaConfig  # the [hf] extra

    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, vocab_size=32000)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    t0 = time.perf_counter()
    plan = blockopt.partition(model, snr="builtin", state_budget=0.55)  # AdamMini(model)'s plan
    t1 = time.perf_counter()
    opt = blockopt.AdamMini(model, plan=plan)
    t2 = time.perf_counter()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()  # allocates the state (meta tensors: shapes only)
    t3 = time.perf_counter()
    print(f"Llama 7B config: {plan.num_params / 1e9:.2f}B parameters, {plan.num_blocks:,} blocks")
    print(f"plan {1e3 * (t1 - t0):.1f} ms, optimizer {1e3 * (t2 - t1):.1f} ms, state {1e3 * (t3 - t2):.1f} ms, "
          f"total {1e3 * (t3 - t0):.1f} ms")


if __name__ == "__main__":
    main()
