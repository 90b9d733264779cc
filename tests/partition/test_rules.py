"""Partition rules (``blockopt.partition``): golden block counts and every rule family.

The golden numbers are computed by hand in the comments from docs/algorithms.md
section 2 (all rules: docs/partition.md): query/key one block per head,
value/attention output/MLP/output head one block per output neuron, token
embeddings one per row, position embeddings, norms and other 1-D tensors one
block, biases per element.
Models are built on the ``meta`` device from configs (nothing is downloaded).
"""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from torch import nn

import blockopt
from blockopt.kernels.blocks import Geometry
from blockopt.models import build_model

HF_REASON = "Hugging Face transformers is not installed (pip install blockopt[test])"


# ---------------------------------------------------------------------------
# helpers


def _quiet_partition(model: nn.Module, **kwargs) -> blockopt.PartitionPlan:
    """partition() that fails the test on any warning (golden models must be fully recognised)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plan = blockopt.partition(model, **kwargs)
    assert plan.warnings == ()
    return plan


def _summary(plan, prefix: str) -> dict[str, tuple[str, int]]:
    """{name without prefix: (kind, num_blocks)} for the entries under ``prefix``."""
    return {n[len(prefix):]: (e.kind, e.num_blocks) for n, e in plan.items() if n.startswith(prefix)}


def _check_decay(plan) -> None:
    """Norms, biases and other 1-D tensors are not decayed; every matrix is."""
    for name, e in plan.items():
        assert e.rule, name  # every entry records the rule that decided it
        if e.role in ("norm", "bias"):
            assert e.weight_decay is False, name
        elif len(e.shape) >= 2:
            assert e.weight_decay is True, name


@pytest.fixture(scope="module")
def hf():
    return pytest.importorskip("transformers", reason=HF_REASON)


def _meta(cls, config):
    with torch.device("meta"):
        return cls(config)


def _llama(hf, tie=False):
    # hidden 32, 4 heads x head_dim 8, GQA: 2 kv heads, MLP 48, vocab 64, 2 layers
    cfg = hf.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16,
                         tie_word_embeddings=tie)
    return _meta(hf.LlamaForCausalLM, cfg)


def _qwen3(hf):
    # hidden 32 but 4 heads x head_dim 16 = 64 (heads * head_dim != hidden), 2 kv heads
    cfg = hf.Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         max_position_embeddings=16, tie_word_embeddings=False)
    return _meta(hf.Qwen3ForCausalLM, cfg)


def _gpt2(hf):
    # n_embd 32, 4 heads x 8, 2 layers, MLP 4*32 = 128, vocab 64, 16 positions, tied head
    cfg = hf.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=16,
                        bos_token_id=0, eos_token_id=0)
    return _meta(hf.GPT2LMHeadModel, cfg)


def _bert(hf):
    # hidden 32, 4 heads x 8, 2 layers, MLP 48, vocab 64, 16 positions, 2 token types
    cfg = hf.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=48, max_position_embeddings=16, type_vocab_size=2)
    return _meta(hf.BertModel, cfg)


def _llama_tiny(**kw):
    # blockopt's own Llama-style model: d 128, 4 heads x 32, 2 kv heads, MLP 384, vocab 256, tied
    return build_model("llama-tiny", device="meta", n_layers=1, **kw)


class MyAttention(nn.Module):
    """A custom attention module that carries no head counts at all."""

    def __init__(self, d: int = 32, q: int = 32, kv: int = 16) -> None:
        super().__init__()
        self.wq = nn.Linear(d, q, bias=False)
        self.wk = nn.Linear(d, kv, bias=False)
        self.wv = nn.Linear(d, kv, bias=False)
        self.wo = nn.Linear(q, d, bias=False)


class MyBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = MyAttention()
        self.ff = nn.Linear(32, 64)


# ---------------------------------------------------------------------------
# 1. golden block counts for Hugging Face models and nn.TransformerEncoderLayer


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_golden_llama_gqa(hf, tie):
    plan = _quiet_partition(_llama(hf, tie))
    layer = {
        "self_attn.q_proj.weight": ("head", 4),  # [32, 32]: 4 heads x 8 rows
        "self_attn.k_proj.weight": ("head", 2),  # [16, 32]: 2 kv heads x 8 rows
        "self_attn.v_proj.weight": ("row", 16),  # [16, 32]
        "self_attn.o_proj.weight": ("row", 32),  # [32, 32]
        "mlp.gate_proj.weight": ("row", 48),
        "mlp.up_proj.weight": ("row", 48),
        "mlp.down_proj.weight": ("row", 32),
        "input_layernorm.weight": ("tensor", 1),
        "post_attention_layernorm.weight": ("tensor", 1),
    }  # 4 + 2 + 16 + 32 + 48 + 48 + 32 + 1 + 1 = 184 per layer
    for i in range(2):
        assert _summary(plan, f"model.layers.{i}.") == layer
    assert plan["model.layers.0.self_attn.q_proj.weight"].geometry == Geometry(0, ((32, 8),))
    assert plan["model.layers.0.self_attn.k_proj.weight"].geometry == Geometry(0, ((16, 8),))
    assert plan["model.layers.0.self_attn.q_proj.weight"].role == "query"
    assert plan["model.layers.0.self_attn.k_proj.weight"].role == "key"
    assert plan["model.embed_tokens.weight"].geometry == Geometry(0, ((64, 1),))  # per token
    assert (plan["model.norm.weight"].kind, plan["model.norm.weight"].num_blocks) == ("tensor", 1)
    assert plan["lm_head.weight"].num_blocks == 64  # per token
    _check_decay(plan)
    if tie:
        # one parameter, one state: lm_head.weight is an alias of the embedding
        assert plan["lm_head.weight"] is plan["model.embed_tokens.weight"]
        assert "lm_head.weight" not in list(plan)
        assert plan.num_blocks == 2 * 184 + 64 + 1  # = 433
    else:
        assert plan["lm_head.weight"].role == "output"
        assert plan.num_blocks == 2 * 184 + 64 + 1 + 64  # = 497


def test_golden_qwen3_head_dim_not_hidden_over_heads(hf):
    plan = _quiet_partition(_qwen3(hf))
    layer = {
        "self_attn.q_proj.weight": ("head", 4),  # [64, 32]: 4 heads x 16 (not 8 heads of hidden/4)
        "self_attn.k_proj.weight": ("head", 2),  # [32, 32]: 2 kv heads x 16
        "self_attn.v_proj.weight": ("row", 32),  # [32, 32]
        "self_attn.o_proj.weight": ("row", 32),  # [32, 64]
        "self_attn.q_norm.weight": ("tensor", 1),
        "self_attn.k_norm.weight": ("tensor", 1),
        "mlp.gate_proj.weight": ("row", 48),
        "mlp.up_proj.weight": ("row", 48),
        "mlp.down_proj.weight": ("row", 32),
        "input_layernorm.weight": ("tensor", 1),
        "post_attention_layernorm.weight": ("tensor", 1),
    }  # 4 + 2 + 32 + 32 + 1 + 1 + 48 + 48 + 32 + 1 + 1 = 202 per layer
    for i in range(2):
        assert _summary(plan, f"model.layers.{i}.") == layer
    q = plan["model.layers.0.self_attn.q_proj.weight"]
    assert q.shape == (64, 32) and q.geometry == Geometry(0, ((64, 16),))
    k = plan["model.layers.0.self_attn.k_proj.weight"]
    assert k.shape == (32, 32) and k.geometry == Geometry(0, ((32, 16),))
    _check_decay(plan)
    assert plan.num_blocks == 2 * 202 + 64 + 1 + 64  # = 533


def test_golden_gpt2_fused_conv1d_and_tied_head(hf):
    plan = _quiet_partition(_gpt2(hf))
    layer = {
        "ln_1.weight": ("tensor", 1),
        "ln_1.bias": ("element", 32),
        "attn.c_attn.weight": ("fused", 40),  # [32, 96]: q 4 heads + k 4 heads + v 32 columns
        "attn.c_attn.bias": ("element", 96),
        "attn.c_proj.weight": ("column", 32),  # Conv1D [in, out]: output neurons are columns
        "attn.c_proj.bias": ("element", 32),
        "ln_2.weight": ("tensor", 1),
        "ln_2.bias": ("element", 32),
        "mlp.c_fc.weight": ("column", 128),  # [32, 128]
        "mlp.c_fc.bias": ("element", 128),
        "mlp.c_proj.weight": ("column", 32),  # [128, 32]
        "mlp.c_proj.bias": ("element", 32),
    }  # 33 + 40 + 96 + 32 + 32 + 33 + 128 + 128 + 32 + 32 = 586 per layer
    for i in range(2):
        assert _summary(plan, f"transformer.h.{i}.") == layer
    c_attn = plan["transformer.h.0.attn.c_attn.weight"]
    assert c_attn.shape == (32, 96)
    assert c_attn.geometry == Geometry(1, ((32, 8), (32, 8), (32, 1)))
    assert c_attn.parts == ("query", "key", "value")
    assert c_attn.role == "qkv"
    assert c_attn.describe() == "fused q:head x4 | k:head x4 | v:column x32"
    assert plan["transformer.h.0.attn.c_proj.weight"].geometry == Geometry(1, ((32, 1),))
    # tied head: one entry, lm_head.weight an alias of wte
    wte = plan["transformer.wte.weight"]
    assert wte.aliases == ("lm_head.weight",)
    assert plan["lm_head.weight"] is wte
    assert (wte.kind, wte.num_blocks) == ("row", 64)
    assert [n for n in plan if "lm_head" in n] == []
    wpe = plan["transformer.wpe.weight"]
    assert (wpe.kind, wpe.num_blocks, wpe.role) == ("tensor", 1, "position_embedding")
    _check_decay(plan)
    assert plan.num_blocks == 2 * 586 + 64 + 1 + 33  # wte + wpe + ln_f (1 + 32) = 1270


def test_golden_bert(hf):
    plan = _quiet_partition(_bert(hf))
    emb = {
        "word_embeddings.weight": ("row", 64),  # per token
        "position_embeddings.weight": ("tensor", 1),  # one block
        "token_type_embeddings.weight": ("row", 2),
        "LayerNorm.weight": ("tensor", 1),
        "LayerNorm.bias": ("element", 32),
    }  # 64 + 1 + 2 + 1 + 32 = 100
    assert _summary(plan, "embeddings.") == emb
    layer = {
        "attention.self.query.weight": ("head", 4),
        "attention.self.query.bias": ("element", 32),
        "attention.self.key.weight": ("head", 4),
        "attention.self.key.bias": ("element", 32),
        "attention.self.value.weight": ("row", 32),
        "attention.self.value.bias": ("element", 32),
        "attention.output.dense.weight": ("row", 32),
        "attention.output.dense.bias": ("element", 32),
        "attention.output.LayerNorm.weight": ("tensor", 1),
        "attention.output.LayerNorm.bias": ("element", 32),
        "intermediate.dense.weight": ("row", 48),
        "intermediate.dense.bias": ("element", 48),
        "output.dense.weight": ("row", 32),
        "output.dense.bias": ("element", 32),
        "output.LayerNorm.weight": ("tensor", 1),
        "output.LayerNorm.bias": ("element", 32),
    }  # 36 + 36 + 64 + 64 + 33 + 96 + 64 + 33 = 426 per layer
    for i in range(2):
        assert _summary(plan, f"encoder.layer.{i}.") == layer
    assert plan["encoder.layer.0.attention.self.query.weight"].geometry == Geometry(0, ((32, 8),))
    assert plan["embeddings.position_embeddings.weight"].role == "position_embedding"
    assert plan["embeddings.word_embeddings.weight"].role == "embedding"
    _check_decay(plan)
    assert plan.num_blocks == 100 + 2 * 426 + 32 + 32  # + pooler weight rows + bias = 1016


def test_golden_transformer_encoder_layer():
    with torch.device("meta"):
        layer = nn.TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=48)
    plan = _quiet_partition(layer)
    assert _summary(plan, "") == {
        "self_attn.in_proj_weight": ("fused", 40),  # [96, 32]: q 4 heads + k 4 heads + v 32 rows
        "self_attn.in_proj_bias": ("element", 96),
        "self_attn.out_proj.weight": ("row", 32),
        "self_attn.out_proj.bias": ("element", 32),
        "linear1.weight": ("row", 48),
        "linear1.bias": ("element", 48),
        "linear2.weight": ("row", 32),
        "linear2.bias": ("element", 32),
        "norm1.weight": ("tensor", 1),
        "norm1.bias": ("element", 32),
        "norm2.weight": ("tensor", 1),
        "norm2.bias": ("element", 32),
    }
    e = plan["self_attn.in_proj_weight"]
    assert e.geometry == Geometry(0, ((32, 8), (32, 8), (32, 1)))
    assert e.parts == ("query", "key", "value")
    _check_decay(plan)
    assert plan.num_blocks == 40 + 96 + 64 + 96 + 64 + 66  # = 426


# ---------------------------------------------------------------------------
# 3. overrides


def test_override_is_a_full_match():
    model = _llama_tiny()
    base = blockopt.partition(model)
    # a substring of the name does not match: an error, not a silent no-op
    for pattern in ("q_proj.weight", "blocks.0.attn.q_proj", r"attn\.q_proj\.weight"):
        with pytest.raises(ValueError, match=re.escape(repr(pattern))):
            blockopt.partition(model, overrides={pattern: "element"})
    plan = blockopt.partition(model, overrides={r"blocks\.0\.attn\.q_proj\.weight": "element"})
    assert (plan["blocks.0.attn.q_proj.weight"].kind, plan["blocks.0.attn.q_proj.weight"].num_blocks) == (
        "element", 128 * 128)
    assert plan["blocks.0.attn.q_proj.weight"].rule.startswith("override")
    for name in plan:
        if name != "blocks.0.attn.q_proj.weight":
            assert plan[name] == base[name], name


def test_override_matches_aliases_of_tied_weights():
    model = _llama_tiny()  # lm_head.weight is tied to embed.weight
    plan = blockopt.partition(model, overrides={r"lm_head\.weight": "tensor"})
    assert plan["embed.weight"].kind == "tensor"
    assert plan["lm_head.weight"] is plan["embed.weight"]


@pytest.mark.parametrize(
    "order, expected",
    [((r".*proj\.weight", r".*q_proj\.weight"), ("element", "tensor")),
     ((r".*q_proj\.weight", r".*proj\.weight"), ("tensor", "tensor"))],
)
def test_later_override_wins(order, expected):
    specs = {r".*proj\.weight": "tensor", r".*q_proj\.weight": "element"}
    plan = blockopt.partition(_llama_tiny(), overrides={p: specs[p] for p in order})
    assert (plan["blocks.0.attn.q_proj.weight"].kind, plan["blocks.0.attn.k_proj.weight"].kind) == expected


@pytest.mark.parametrize(
    "spec, kind, geometry",
    [
        ("element", "element", Geometry(-1, ((64 * 128, 1),))),
        ("tensor", "tensor", Geometry(-1, ((64 * 128, 64 * 128),))),
        ("row", "row", Geometry(0, ((64, 1),))),
        ("column", "column", Geometry(1, ((128, 1),))),
        ("head:16", "head", Geometry(0, ((64, 16),))),
        ({"kind": "head", "head_dim": 32}, "head", Geometry(0, ((64, 32),))),
        ({"kind": "row", "weight_decay": False}, "row", Geometry(0, ((64, 1),))),
    ],
)
def test_override_kinds(spec, kind, geometry):
    # k_proj is [64, 128] (2 kv heads x 32), so rows and columns differ
    plan = blockopt.partition(_llama_tiny(), overrides={r".*k_proj\.weight": spec})
    e = plan["blocks.0.attn.k_proj.weight"]
    assert (e.kind, e.geometry) == (kind, geometry)
    assert e.num_blocks == geometry.num_blocks
    assert e.weight_decay is (spec.get("weight_decay", True) if isinstance(spec, dict) else True)


def test_override_weight_decay_only_keeps_geometry():
    model = _llama_tiny()
    base = blockopt.partition(model)
    plan = blockopt.partition(model, overrides={r".*ln_1\.weight": {"weight_decay": True},
                                                r".*q_proj\.weight": {"weight_decay": False}})
    for name in ("blocks.0.ln_1.weight", "blocks.0.attn.q_proj.weight"):
        assert plan[name].geometry == base[name].geometry
        assert plan[name].weight_decay is not base[name].weight_decay


class _EveryRule(nn.Module):
    """One parameter for every rule family."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 8)  # embedding
        self.pos_embedding = nn.Embedding(6, 8)  # position embedding
        self.attn = MyAttention(8, 8, 8)  # attention projections (no heads known)
        self.mha = nn.MultiheadAttention(8, 2)  # fused in_proj
        self.norm = nn.LayerNorm(8)  # norm + bias
        self.mlp = nn.Linear(8, 16)  # MLP + bias
        self.conv = nn.Conv2d(2, 3, 2)  # conv
        self.scale = nn.Parameter(torch.ones(()))  # 0-D
        self.table = nn.Parameter(torch.zeros(4, 5))  # unknown 2-D
        self.head = nn.Linear(8, 10, bias=False)  # output head

    def get_input_embeddings(self):
        return self.embed

    def get_output_embeddings(self):
        return self.head


def test_override_beats_every_rule():
    with torch.device("meta"):
        model = _EveryRule()
    base = blockopt.partition(model, warn=False)
    roles = {e.role for e in base.values()}
    assert {"embedding", "position_embedding", "query", "key", "value", "attn_out", "qkv", "norm", "bias",
            "mlp", "conv", "other", "output"} <= roles
    plan = blockopt.partition(model, overrides={".*": "element"}, warn=False)
    for name, e in plan.items():
        assert e.num_blocks == e.numel, name
        assert e.kind == ("element" if e.numel > 1 else "tensor"), name
        assert e.parts == (), name
        assert e.rule.startswith("override"), name
        assert e.weight_decay is base[name].weight_decay, name
    plan = blockopt.partition(model, overrides={".*": {"weight_decay": True}}, warn=False)
    for name, e in plan.items():
        assert e.weight_decay is True and e.geometry == base[name].geometry, name


# value_single_block


def test_value_single_block_llama(hf):
    model = _llama(hf)
    plan = _quiet_partition(model, value_single_block=True)
    v = plan["model.layers.0.self_attn.v_proj.weight"]
    assert (v.kind, v.num_blocks) == ("tensor", 1)
    assert v.geometry == Geometry(-1, ((16 * 32, 16 * 32),))
    assert plan["model.layers.0.self_attn.k_proj.weight"].num_blocks == 2  # key unaffected
    assert plan.num_blocks == 497 - 2 * (16 - 1)  # = 467
    assert blockopt.partition(_llama_tiny(), value_single_block=True)["blocks.0.attn.v_proj.weight"].num_blocks == 1


def test_value_single_block_gpt2_c_attn(hf):
    plan = _quiet_partition(_gpt2(hf), value_single_block=True)
    e = plan["transformer.h.0.attn.c_attn.weight"]
    assert e.geometry == Geometry(1, ((32, 8), (32, 8), (32, 32)))
    assert e.num_blocks == 4 + 4 + 1
    assert e.describe() == "fused q:head x4 | k:head x4 | v:tensor x1"
    assert plan.num_blocks == 1270 - 2 * (32 - 1)  # = 1208


def test_value_single_block_multihead_attention():
    fused = nn.MultiheadAttention(32, 4)
    e = blockopt.partition(fused, value_single_block=True)["in_proj_weight"]
    assert e.geometry == Geometry(0, ((32, 8), (32, 8), (32, 32)))
    assert blockopt.partition(fused)["in_proj_weight"].geometry == Geometry(0, ((32, 8), (32, 8), (32, 1)))
    # separate q/k/v weights when kdim/vdim differ from embed_dim
    split = nn.MultiheadAttention(32, 4, kdim=16, vdim=24)
    plan = blockopt.partition(split)
    assert plan["q_proj_weight"].geometry == Geometry(0, ((32, 8),))
    assert plan["k_proj_weight"].geometry == Geometry(0, ((32, 8),))
    assert (plan["v_proj_weight"].kind, plan["v_proj_weight"].num_blocks) == ("row", 32)
    v = blockopt.partition(split, value_single_block=True)["v_proj_weight"]
    assert (v.kind, v.num_blocks) == ("tensor", 1)


# ---------------------------------------------------------------------------
# 4. hints, unknown tensors, convolutions, 0-D


@pytest.mark.parametrize(
    "hints",
    [{"num_heads": 4, "num_kv_heads": 2}, {"head_dim": 8, "num_kv_heads": 2},
     {"num_heads": 4, "num_kv_heads": 2, "head_dim": 8}],
)
def test_hints_for_custom_attention(hints):
    plan = _quiet_partition(MyBlock(), **hints)
    assert plan["attn.wq.weight"].geometry == Geometry(0, ((32, 8),))  # 4 heads
    assert plan["attn.wk.weight"].geometry == Geometry(0, ((16, 8),))  # 2 kv heads
    assert (plan["attn.wv.weight"].kind, plan["attn.wv.weight"].num_blocks) == ("row", 16)
    assert (plan["attn.wo.weight"].kind, plan["attn.wo.weight"].num_blocks) == ("row", 32)
    assert (plan["ff.weight"].kind, plan["ff.weight"].num_blocks) == ("row", 64)
    assert "hints" in plan["attn.wq.weight"].rule


def test_custom_attention_without_hints_is_listed_in_one_warning():
    with pytest.warns(UserWarning, match="matched no structural rule") as record:
        plan = blockopt.partition(MyBlock())
    ours = [str(w.message) for w in record if "blockopt.partition" in str(w.message)]
    assert len(ours) == 1
    assert "attn.wq.weight" in ours[0] and "attn.wk.weight" in ours[0]
    assert (plan["attn.wq.weight"].kind, plan["attn.wq.weight"].num_blocks) == ("row", 32)
    assert (plan["attn.wk.weight"].kind, plan["attn.wk.weight"].num_blocks) == ("row", 16)


@pytest.mark.parametrize(
    "factory, hints",
    [
        ("llama-tiny", {"num_heads": 3}),  # q_proj has 128 rows; 3 heads of head_dim 32 do not fill it
        ("llama-tiny", {"head_dim": 5}),
        ("llama-tiny", {"num_heads": 4, "num_kv_heads": 4}),  # k_proj has 64 rows = 2 kv heads
        ("mha", {"num_heads": 5}),  # embed_dim 32
        ("mha", {"head_dim": 5}),
        ("custom", {"num_heads": 4, "head_dim": 16}),  # wq has 32 rows, not 64
        ("custom", {"num_heads": 3}),  # 32 rows are not 3 heads
        ("custom", {"head_dim": 5}),  # 32 rows are not heads of 5
    ],
    ids=lambda x: x if isinstance(x, str) else ",".join(f"{k}={v}" for k, v in x.items()),
)
def test_hints_that_do_not_divide_raise(factory, hints):
    model = {"llama-tiny": _llama_tiny, "mha": lambda: nn.MultiheadAttention(32, 4), "custom": MyBlock}[factory]()
    with pytest.raises(ValueError) as info:
        blockopt.partition(model, **hints)
    message = str(info.value)
    for name, value in hints.items():
        assert f"{name}={value}" in message, message


def test_unknown_tensors_listed_in_one_warning():
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Parameter(torch.zeros(3, 4))
            self.b = nn.Parameter(torch.zeros(2, 3, 4))
            self.sub = nn.Module()
            self.sub.c = nn.Parameter(torch.zeros(5, 2))
            self.gain = nn.Parameter(torch.ones(7))  # 1-D: one block, silently

    with pytest.warns(UserWarning, match="matched no structural rule") as record:
        plan = blockopt.partition(Odd())
    ours = [str(w.message) for w in record if "blockopt.partition" in str(w.message)]
    assert len(ours) == 1
    message = ours[0]
    assert "3 tensor(s)" in message
    for listed in ("a [3, 4]", "b [2, 3, 4]", "sub.c [5, 2]"):
        assert listed in message
    assert "gain" not in message
    assert plan["a"].geometry == Geometry(0, ((3, 1),))
    assert plan["b"].geometry == Geometry(0, ((2, 1),))
    assert plan["sub.c"].geometry == Geometry(0, ((5, 1),))
    assert (plan["gain"].kind, plan["gain"].num_blocks, plan["gain"].weight_decay) == ("tensor", 1, False)
    assert len(plan.warnings) == 1 and plan.warnings[0] in message
    # warn=False: the same plan, no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quiet = blockopt.partition(Odd(), warn=False)
    assert quiet == plan and quiet.warnings == plan.warnings


def test_conv_per_output_channel():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv1d(4, 6, 2), nn.ConvTranspose2d(8, 4, 3))
    plan = _quiet_partition(model)
    assert plan["0.weight"].geometry == Geometry(0, ((8, 1),))  # [8, 3, 3, 3]: 8 output channels
    assert plan["0.weight"].role == "conv" and plan["0.weight"].weight_decay
    assert (plan["0.bias"].kind, plan["0.bias"].num_blocks) == ("element", 8)
    assert plan["1.weight"].geometry == Geometry(0, ((6, 1),))
    assert plan["2.weight"].geometry == Geometry(1, ((4, 1),))  # transposed: [in 8, out 4, 3, 3]
    assert plan.num_blocks == 8 + 8 + 6 + 6 + 4 + 4


def test_zero_dim_parameter_is_one_block():
    class Scalar(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.temperature = nn.Parameter(torch.tensor(1.0))

    e = _quiet_partition(Scalar())["temperature"]
    assert (e.shape, e.kind, e.num_blocks, e.weight_decay) == ((), "tensor", 1, False)
    assert e.geometry == Geometry(-1, ((1, 1),))


# ---------------------------------------------------------------------------
# 6. bad input: one table


_BAD_INPUT = [
    *[(dict(**{hint: v}), [hint, repr(v)])
      for hint in ("num_heads", "num_kv_heads", "head_dim") for v in (0, -1, 2.5, True)],
    ({"num_heads": 4, "num_kv_heads": 3}, ["num_kv_heads", "3"]),
    ({"num_heads": 3}, ["num_heads=3"]),
    ({"value_single_block": "yes"}, ["value_single_block", "'yes'"]),
    ({"overrides": {"q_proj.weight": "element"}}, ["overrides", "'q_proj.weight'"]),
    ({"overrides": {".*": "diagonal"}}, ["overrides", "'diagonal'"]),
    ({"overrides": {r".*q_proj\.weight": "head:5"}}, ["overrides", "head_dim=5"]),
    ({"overrides": {r".*q_proj\.weight": {"kind": "head", "head_dim": 3}}}, ["overrides", "head_dim=3"]),
    ({"overrides": {r".*q_proj\.weight": {"kind": "head"}}}, ["overrides", "head_dim", "None"]),
    ({"overrides": {r".*q_proj\.weight": "head:abc"}}, ["overrides", "'abc'"]),
    ({"overrides": {r".*q_proj\.weight": 3}}, ["overrides", "3"]),
    ({"overrides": {r".*q_proj\.weight": {"lr": 0.1}}}, ["overrides", "'lr'"]),
    ({"overrides": {r".*q_proj\.weight": {"weight_decay": "no"}}}, ["overrides", "weight_decay", "'no'"]),
    ({"overrides": {r"norm\.weight": "column"}}, ["overrides", "'column'"]),
    ({"overrides": {"(": "row"}}, ["overrides", "'('"]),
    ({"overrides": {3: "row"}}, ["overrides", "3"]),
]


@pytest.mark.parametrize("kwargs, must_contain", _BAD_INPUT, ids=[repr(k) for k, _ in _BAD_INPUT])
def test_bad_input_table(kwargs, must_contain):
    with pytest.raises(ValueError) as info:
        blockopt.partition(_llama_tiny(), **kwargs)
    message = str(info.value)
    for piece in must_contain:
        assert piece in message, f"{piece!r} not in {message!r}"


def test_model_must_be_a_module():
    with pytest.raises(TypeError, match="model"):
        blockopt.partition([nn.Parameter(torch.zeros(2))])


def test_mlp_as_wide_as_the_vocabulary_is_not_taken_for_the_output_head():
    """Shape alone ([vocab, d]) names the untied head only outside numbered layers."""

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.up = nn.Linear(16, 64)
            self.down = nn.Linear(64, 16)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok = nn.Embedding(64, 16)
            self.layers = nn.ModuleList([Block(), Block()])
            self.head = nn.Linear(16, 64, bias=False)

    plan = blockopt.partition(Net())
    assert plan["head.weight"].role == "output"
    assert plan["layers.0.up.weight"].role == plan["layers.1.up.weight"].role == "mlp"


def test_hf_llama_with_intermediate_size_equal_to_vocab_keeps_mlp_roles():
    transformers = pytest.importorskip("transformers", reason="needs pip install 'blockopt[hf]'")
    cfg = transformers.LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   intermediate_size=96, vocab_size=96, tie_word_embeddings=False)
    plan = blockopt.partition(transformers.LlamaForCausalLM(cfg))
    assert plan["lm_head.weight"].role == "output"
    assert plan["model.layers.0.mlp.up_proj.weight"].role == "mlp"
    assert plan["model.layers.1.mlp.gate_proj.weight"].role == "mlp"
