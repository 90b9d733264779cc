"""A torchtitan-style model (tests/integrations/titan_model.py): blocks decided from structure alone."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from titan_model import ModelArgs, Transformer, next_token_loss, pattern_batches

import blockopt
from blockopt.kernels.blocks import Geometry


def _expected(args: ModelArgs) -> dict[str, tuple[str, Geometry, bool]]:
    """name -> (role, geometry, decay), written from the config, not from the engine."""
    dh = args.dim // args.n_heads
    kv = args.n_kv_heads or args.n_heads
    rows = lambda n: Geometry(0, ((n, 1),))
    heads = lambda n: Geometry(0, ((n * dh, dh),))
    whole = Geometry(-1, ((args.dim, args.dim),))
    exp = {
        "tok_embeddings.weight": ("embedding", rows(args.vocab_size), True),
        "norm.weight": ("norm", whole, False),
        "output.weight": ("output", rows(args.vocab_size), True),
    }
    for i in range(args.n_layers):
        p = f"layers.{i}."
        exp |= {
            p + "attention.wq.weight": ("query", heads(args.n_heads), True),
            p + "attention.wk.weight": ("key", heads(kv), True),
            p + "attention.wv.weight": ("value", rows(kv * dh), True),
            p + "attention.wo.weight": ("attn_out", rows(args.dim), True),
            p + "feed_forward.w1.weight": ("mlp", rows(args.hidden_dim), True),
            p + "feed_forward.w2.weight": ("mlp", rows(args.dim), True),
            p + "feed_forward.w3.weight": ("mlp", rows(args.hidden_dim), True),
            p + "attention_norm.weight": ("norm", whole, False),
            p + "ffn_norm.weight": ("norm", whole, False),
        }
    return exp


@pytest.mark.parametrize("args", [
    ModelArgs(),  # GQA: 4 query heads, 2 kv heads of 8
    ModelArgs(n_kv_heads=None, n_layers=1),  # plain multi-head attention
    ModelArgs(dim=4096, n_layers=1, n_heads=32, n_kv_heads=8, vocab_size=128256, hidden_dim=14336),  # 8B shapes
], ids=["gqa", "mha", "llama3-8b-layer"])
def test_plan_from_structure_without_hints(args):
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("error")  # every tensor is recognised: no "unknown tensor" warning
        model = Transformer(args)
        plan = blockopt.partition(model)
    expected = _expected(args)
    assert sorted(plan) == sorted(expected)
    for name, (role, geometry, decay) in expected.items():
        e = plan[name]
        assert (e.role, e.geometry, e.weight_decay) == (role, geometry, decay), name
    dh, kv = args.dim // args.n_heads, args.n_kv_heads or args.n_heads
    per_layer = args.n_heads + kv + kv * dh + args.dim + 2 * args.hidden_dim + args.dim + 2
    assert plan.num_blocks == args.n_layers * per_layer + 2 * args.vocab_size + 1
    assert "heads x" in plan["layers.0.attention.wq.weight"].rule  # decided from the module's head counts


def _warmup_cosine(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))


def test_trains_with_adam_mini_and_a_scheduler():
    torch.manual_seed(0)
    args = ModelArgs()
    model = Transformer(args)
    opt = blockopt.AdamMini(model, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    steps, warmup = 30, 5
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _warmup_cosine(s, warmup, steps))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    batches = pattern_batches(args.vocab_size, steps, seed=0)
    losses, lrs = [], []
    for x in batches:
        lrs.append(opt.param_groups[0]["lr"])
        loss = next_token_loss(model, x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    # the scheduler drives the group's lr
    assert lrs == pytest.approx([1e-2 * _warmup_cosine(s, warmup, steps) for s in range(steps)], rel=1e-12)
    # every parameter moved; one second-moment value per planned block
    for n, p in model.named_parameters():
        assert not torch.equal(p, before[n]), n
        assert opt.state[p]["block_exp_avg_sq"].numel() == opt.plan[n].num_blocks, n
    assert sum(opt.state[p]["block_exp_avg_sq"].numel() for p in model.parameters()) == opt.plan.num_blocks
    # it learns the counting patterns (start: ~ln 97 = 4.57)
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert first > 4.0 and last < first - 1.0, losses


def test_output_head_found_without_get_input_embeddings():
    """The model's one token table (position tables aside) stands in for get_input_embeddings()."""
    torch.manual_seed(0)

    class WithPositions(Transformer):
        def __init__(self, args: ModelArgs) -> None:
            super().__init__(args)
            self.pos_embeddings = torch.nn.Embedding(args.max_seq_len, args.dim)

    class TwoTables(Transformer):
        def __init__(self, args: ModelArgs) -> None:
            super().__init__(args)
            self.segment_embeddings = torch.nn.Embedding(args.vocab_size, args.dim)

    args = ModelArgs(n_layers=1)
    plan = blockopt.partition(WithPositions(args))
    assert plan["output.weight"].role == "output"
    assert plan["pos_embeddings.weight"].role == "position_embedding"
    assert plan["tok_embeddings.weight"].role == "embedding"
    # two token tables: which one the head mirrors is not known; a plain linear layer, same blocks (rows)
    plan = blockopt.partition(TwoTables(args))
    assert (plan["output.weight"].role, plan["output.weight"].kind) == ("mlp", "row")
