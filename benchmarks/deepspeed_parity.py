"""AdamMini (or torch's AdamW) under DeepSpeed ZeRO against one process: the largest relative
difference of any parameter after 6 steps (lr 1e-3, eps 1e-5, weight decay 0.1; each rank takes its
share of a global batch of 12). Run with torchrun on CPU:

    DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 benchmarks/deepspeed_parity.py 2 mini
    DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 benchmarks/deepspeed_parity.py 2 adamw

Arguments: the ZeRO stage (1, 2 or 3) and ``mini`` or ``adamw``.
"""
import os
import sys

import deepspeed
import torch
import torch.nn.functional as F

import blockopt
from blockopt.integrations.deepspeed import attach
from blockopt.models import build_model

stage = int(sys.argv[1]); which = sys.argv[2]
def mk():
    torch.manual_seed(0)
    return build_model("llama-tiny", n_layers=1, n_heads=6, n_kv_heads=1, d_model=24, vocab_size=67, max_seq_len=32)
model = mk()
kw = {"lr": 1e-3, "eps": 1e-5, "weight_decay": 0.1}
opt = blockopt.AdamMini(model, rules="official", **kw) if which == "mini" else torch.optim.AdamW(model.parameters(), **kw)
world = int(os.environ["WORLD_SIZE"]); rank = int(os.environ["RANK"])
cfg = {"train_micro_batch_size_per_gpu": 12 // world, "gradient_accumulation_steps": 1, "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True}
engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
if which == "mini":
    attach(engine)
g = torch.Generator().manual_seed(1)
xs = [torch.randint(0, 67, (12, 16), generator=g) for _ in range(6)]
for x in xs:
    xb = x[rank * (12 // world):(rank + 1) * (12 // world)]
    logits = engine(xb)
    loss = F.cross_entropy(logits.reshape(-1, 67), xb.reshape(-1))
    engine.backward(loss)
    engine.step()
# single process reference
ref = mk()
ro = blockopt.AdamMini(ref, rules="official", **kw) if which == "mini" else torch.optim.AdamW(ref.parameters(), **kw)
for x in xs:
    ro.zero_grad()
    F.cross_entropy(ref(x).reshape(-1, 67), x.reshape(-1)).backward()
    ro.step()
if rank == 0:
    worst = 0
    for (n, p), q in zip(engine.module.named_parameters(), ref.parameters()):
        worst = max(worst, ((p.detach() - q.detach()).abs().max() / q.abs().max()).item())
    print("WORST", which, stage, world, worst)
