"""Blockwise LR groups: role -> block type on real models, multipliers through schedules, AdamW and
AdamMini stepping with them (against per-type reference optimizers), state_dict round trips, errors."""

from __future__ import annotations

import copy
import io
import math
import re

import pytest
import torch
from torch import nn

import blockopt
from blockopt import BLOCKWISE_LR_MULTIPLIERS, AdamMini, blockwise_block_types, blockwise_lr_groups
from blockopt.bench.runner import lr_at
from blockopt.models import build_model

PAPER = {"embedding": 10.0, "qk": 8.0, "vo": 4.0, "ffn": 6.0, "norm": 1.0}
SMALL = {"vocab_size": 64, "d_model": 32, "n_layers": 1, "n_heads": 4, "max_seq_len": 32}


def tiny(name: str, seed: int = 0) -> nn.Module:
    kv = {"n_kv_heads": 2} if name.startswith("llama") else {}
    return build_model(name, seed=seed, **SMALL, **kv)


def expected_type(name: str) -> str:
    """The block type written out by hand from the built-in models' names (independent of the plan)."""
    rules = [
        (r"(embed|wpe|lm_head)\.weight", "embedding"),
        (r".*\.(q_proj|k_proj)\.weight", "qk"),
        (r".*\.(v_proj|o_proj)\.weight", "vo"),
        (r".*\.mlp\.\w+\.weight", "ffn"),
        (r".*(ln_\d|norm)\.weight", "norm"),
        (r".*\.bias", "norm"),
    ]
    for pattern, t in rules:
        if re.fullmatch(pattern, name):
            return t
    raise AssertionError(f"no hand-written type for {name}")


def test_paper_multipliers():
    assert dict(BLOCKWISE_LR_MULTIPLIERS) == PAPER
    with pytest.raises(TypeError):
        BLOCKWISE_LR_MULTIPLIERS["qk"] = 1.0  # read-only: no module-level mutable state


@pytest.mark.parametrize("name", ["llama-tiny", "gpt2-tiny"])
def test_builtin_models_map_every_parameter(name):
    model = tiny(name)
    types = blockwise_block_types(model)
    assert set(types) == {n for n, _ in model.named_parameters()}
    assert types == {n: expected_type(n) for n in types}
    assert set(types.values()) == set(PAPER)  # every block type is present in both


@pytest.mark.parametrize("name", ["llama-tiny", "gpt2-tiny"])
def test_groups_carry_multiplier_type_and_the_plans_decay(name):
    model = tiny(name)
    plan = blockopt.partition(model)
    groups = blockwise_lr_groups(model, 1e-3, plan=plan, weight_decay=0.1)
    seen = []
    for g in groups:
        assert g["lr_multiplier"] == PAPER[g["block_type"]]
        assert g["lr"] == 1e-3 * PAPER[g["block_type"]]
        for n, p in g["params"]:
            assert expected_type(n) == g["block_type"]
            assert g["weight_decay"] == (0.1 if plan[n].weight_decay else 0.0)
            seen.append(n)
    assert sorted(seen) == sorted(n for n, _ in model.named_parameters())  # each exactly once
    # one group per (type, decay) present
    assert len({(g["block_type"], g["weight_decay"]) for g in groups}) == len(groups)
    plain = blockwise_lr_groups(model, 1e-3, plan=plan, weight_decay=0.1, named=False)
    assert [[id(p) for p in g["params"]] for g in plain] == [[id(p) for _, p in g["params"]] for g in groups]


def test_hf_gpt2_fused_qkv_gets_the_smaller_multiplier_of_its_parts():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=96, n_positions=16)
    model = transformers.GPT2LMHeadModel(cfg)
    types = blockwise_block_types(model)
    assert types["transformer.wte.weight"] == "embedding"
    assert types["transformer.wpe.weight"] == "embedding"
    assert types["transformer.h.0.attn.c_attn.weight"] == "vo"  # min(qk 8, vo 4)
    assert types["transformer.h.0.attn.c_proj.weight"] == "vo"
    assert types["transformer.h.0.mlp.c_fc.weight"] == "ffn"
    assert types["transformer.h.0.mlp.c_proj.weight"] == "ffn"
    assert types["transformer.h.0.ln_1.weight"] == types["transformer.h.0.attn.c_attn.bias"] == "norm"
    # with QK below VO, the fused tensor follows QK
    assert blockwise_block_types(model, multipliers={"qk": 2.0})["transformer.h.0.attn.c_attn.weight"] == "qk"
    # and an override wins over the role
    forced = blockwise_block_types(model, overrides={r".*c_attn\.weight": "qk"})
    assert forced["transformer.h.0.attn.c_attn.weight"] == "qk"


def test_hf_llama_untied_head_is_embedding():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=96, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(cfg)
    types = blockwise_block_types(model)
    want = {"model.embed_tokens.weight": "embedding", "lm_head.weight": "embedding",
            "model.layers.0.self_attn.q_proj.weight": "qk", "model.layers.0.self_attn.k_proj.weight": "qk",
            "model.layers.0.self_attn.v_proj.weight": "vo", "model.layers.0.self_attn.o_proj.weight": "vo",
            "model.layers.0.mlp.gate_proj.weight": "ffn", "model.layers.0.mlp.up_proj.weight": "ffn",
            "model.layers.0.mlp.down_proj.weight": "ffn", "model.layers.0.input_layernorm.weight": "norm",
            "model.layers.0.post_attention_layernorm.weight": "norm", "model.norm.weight": "norm"}
    assert types == want


# --- schedules ----------------------------------------------------------------------------
STEPS, WARMUP, MIN_RATIO = 40, 5, 0.1


def _norm_group(opt):
    return next(g for g in opt.param_groups if g["block_type"] == "norm")


def _dummy_step(opt):
    for g in opt.param_groups:
        for p in g["params"]:
            p.grad = torch.zeros_like(p)
    opt.step()


def test_lambda_lr_warmup_cosine_keeps_the_ratios():
    model = tiny("llama-tiny")
    base = 2e-3
    opt = torch.optim.AdamW(blockwise_lr_groups(model, base, named=False), lr=base)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, 1.0, STEPS, WARMUP, MIN_RATIO))
    checked = 0
    for step in range(STEPS):
        if step in (0, 2, WARMUP - 1, WARMUP, 17, STEPS - 1):
            f = lr_at(step, 1.0, STEPS, WARMUP, MIN_RATIO)
            for g in opt.param_groups:
                m = PAPER[g["block_type"]]
                assert g["lr"] == (base * m) * f  # LambdaLR: the group's own peak times the factor
                assert g["lr"] / _norm_group(opt)["lr"] == pytest.approx(m, rel=1e-14, abs=0)
            checked += 1
        _dummy_step(opt)
        sched.step()
    assert checked == 6


def test_sequential_warmup_cosine_and_one_cycle_keep_the_ratios():
    model = tiny("gpt2-tiny")
    base = 1e-3
    plan = blockopt.partition(model)
    opt = AdamMini(blockwise_lr_groups(model, base, plan=plan), plan=plan)
    warm = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.1, end_factor=1.0, total_iters=WARMUP)
    cos = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=STEPS - WARMUP, eta_min=0.0)
    sched = torch.optim.lr_scheduler.SequentialLR(opt, [warm, cos], milestones=[WARMUP])
    peaks = []
    for step in range(STEPS):
        norm = _norm_group(opt)["lr"]
        peaks.append(norm)
        for g in opt.param_groups:
            assert g["lr"] / norm == pytest.approx(PAPER[g["block_type"]], rel=1e-12)
        _dummy_step(opt)
        sched.step()
    assert max(peaks) == pytest.approx(base, rel=1e-12) and peaks[0] == pytest.approx(0.1 * base, rel=1e-12)

    opt = torch.optim.AdamW(blockwise_lr_groups(model, base, plan=plan, named=False))
    one = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[g["lr"] for g in opt.param_groups], total_steps=STEPS)
    for step in range(STEPS - 1):
        norm = _norm_group(opt)["lr"]
        for g in opt.param_groups:
            assert g["lr"] / norm == pytest.approx(PAPER[g["block_type"]], rel=1e-12)
        _dummy_step(opt)
        one.step()


# --- stepping -----------------------------------------------------------------------------
def _set_grads(model: nn.Module, step: int) -> None:
    gen = torch.Generator().manual_seed(100 + step)
    for _, p in sorted(model.named_parameters()):
        p.grad = torch.randn(p.shape, generator=gen)


@pytest.mark.parametrize("which", ["adamw", "adam-mini"])
def test_steps_equal_one_reference_optimizer_per_block_type(which):
    """Gradients are fixed per step, so each parameter's trajectory depends only on its own lr and
    decay: the BLR optimizer must equal, per block type, an optimizer over the whole model at that
    type's lr (decay applied where the plan says)."""
    model = tiny("gpt2-tiny")
    plan = blockopt.partition(model)
    base, wd, mults = 3e-3, 0.1, {"embedding": 5.0, "qk": 3.0, "vo": 2.0, "ffn": 1.5, "norm": 0.5}
    types = {n: expected_type(n) for n, _ in model.named_parameters()}
    refs = {}
    for t, m in mults.items():
        ref_model = copy.deepcopy(model)
        if which == "adamw":
            decay = [p for n, p in ref_model.named_parameters() if plan[n].weight_decay]
            rest = [p for n, p in ref_model.named_parameters() if not plan[n].weight_decay]
            ref = torch.optim.AdamW([{"params": decay, "weight_decay": wd}, {"params": rest, "weight_decay": 0.0}],
                                    lr=base * m, betas=(0.9, 0.95), foreach=False)
        else:
            ref = AdamMini(ref_model, lr=base * m, betas=(0.9, 0.95), weight_decay=wd, plan=plan, foreach=False)
        refs[t] = (ref_model, ref)
    if which == "adamw":
        opt = torch.optim.AdamW(blockwise_lr_groups(model, base, plan=plan, multipliers=mults, weight_decay=wd,
                                                    named=False), betas=(0.9, 0.95), foreach=False)
    else:
        opt = AdamMini(blockwise_lr_groups(model, base, plan=plan, multipliers=mults, weight_decay=wd), plan=plan,
                       betas=(0.9, 0.95), foreach=False)
    for step in range(3):
        for m in [model, *(rm for rm, _ in refs.values())]:
            _set_grads(m, step)
        opt.step()
        for _, ref in refs.values():
            ref.step()
    ref_params = {t: dict(rm.named_parameters()) for t, (rm, _) in refs.items()}
    start = dict(tiny("gpt2-tiny").named_parameters())
    for n, p in model.named_parameters():
        torch.testing.assert_close(p, ref_params[types[n]][n], rtol=1e-6, atol=1e-7)
        assert not torch.equal(p, start[n])  # it moved


def test_adam_mini_state_dict_round_trip_with_blr_groups():
    def make(seed=0):
        model = tiny("llama-tiny", seed)
        plan = blockopt.partition(model)
        return model, AdamMini(blockwise_lr_groups(model, 1e-3, plan=plan, weight_decay=0.1), plan=plan,
                               betas=(0.9, 0.95))

    model, opt = make()
    for step in range(2):
        _set_grads(model, step)
        opt.step()
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    model2, opt2 = make(seed=1)
    model2.load_state_dict(model.state_dict())
    for g in opt2.param_groups:  # the loaded groups must bring back the saved lrs and multipliers
        g["lr"] = 0.0
    opt2.load_state_dict(saved)
    for g, g2 in zip(opt.param_groups, opt2.param_groups):
        assert (g2["block_type"], g2["lr_multiplier"], g2["lr"]) == (g["block_type"], g["lr_multiplier"], g["lr"])
    for step in range(2, 4):
        _set_grads(model, step)
        _set_grads(model2, step)
        opt.step()
        opt2.step()
    for (n, p), (_, p2) in zip(model.named_parameters(), model2.named_parameters()):
        assert torch.equal(p, p2), n


# --- bad input ------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, msg", [
    ({"multipliers": {"attention": 2.0}}, "Invalid multipliers key: 'attention'; allowed block types"),
    ({"multipliers": {"qk": 0}}, r"Invalid multipliers\['qk'\]: 0; expected a finite number > 0"),
    ({"multipliers": {"vo": -1.0}}, r"Invalid multipliers\['vo'\]: -1.0"),
    ({"multipliers": {"ffn": "6"}}, r"Invalid multipliers\['ffn'\]: '6'"),
    ({"multipliers": {"ffn": True}}, r"Invalid multipliers\['ffn'\]: True"),
    ({"multipliers": {"norm": math.nan}}, r"Invalid multipliers\['norm'\]: nan"),
    ({"multipliers": [("qk", 2.0)]}, "Invalid multipliers: .*expected a mapping"),
    ({"weight_decay": -0.1}, "Invalid weight_decay: -0.1"),
    ({"named": "yes"}, "Invalid named: 'yes'"),
    ({"overrides": {r".*q_proj\.weight": "attention"}}, r"Invalid overrides\[.*\]: 'attention'; allowed block types"),
    ({"overrides": {r"nothing\.here": "qk"}}, r"Invalid overrides: pattern\(s\) \['nothing\\\\.here'\] match no"),
])
def test_bad_arguments(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        blockwise_lr_groups(tiny("llama-tiny"), 1e-3, **kwargs)


def test_bad_lr_and_params():
    model = tiny("llama-tiny")
    for lr in (-1e-3, math.inf, "1e-3"):
        with pytest.raises(ValueError, match="Invalid lr"):
            blockwise_lr_groups(model, lr)
    with pytest.raises(ValueError, match="Invalid plan: None"):
        blockwise_lr_groups(model.named_parameters(), 1e-3)
    with pytest.raises(ValueError, match=r"not a \(name, tensor\) pair"):
        blockwise_lr_groups(model.parameters(), 1e-3, plan=blockopt.partition(model))
    other = tiny("gpt2-tiny")
    with pytest.raises(ValueError, match="are not in the plan"):
        blockwise_lr_groups(other.named_parameters(), 1e-3, plan=blockopt.partition(model))


class _ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(4, 8, 3)
        self.norm = nn.LayerNorm(8)


def test_unrecognised_tensors_raise_and_overrides_place_them():
    net = _ConvNet()
    with pytest.raises(ValueError, match=r"no block type for 1 parameter\(s\): conv\.weight \(role 'conv'"):
        blockwise_lr_groups(net, 1e-3)
    groups = blockwise_lr_groups(net, 1e-3, overrides={r"conv\.weight": "ffn"})
    by_type = {g["block_type"]: sorted(n for n, _ in g["params"]) for g in groups}
    assert by_type == {"ffn": ["conv.weight"], "norm": ["conv.bias", "norm.bias", "norm.weight"]}
