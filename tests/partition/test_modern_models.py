"""Models people train today, without hints: stacked mixture-of-experts weights, multi-head latent
attention (DeepSeek), LoRA adapters (peft), projections placed by order, compiled models.

Golden counts (docs/algorithms.md, "Stacked experts and low-rank attention"): stacked experts one
block per expert and output neuron in either layout (``[E, out, in]``: E * out row runs;
``[E, in, out]``: E * out stacked columns), expert biases per element, routers and shared experts
per row; MLA's query up-projection one block per head of ``nope + rope`` rows, its key/value
up-projection per head ``[k_nope | v]``: the key rows one block, the value rows one each.
"""

from __future__ import annotations

import importlib
import inspect
import math
import pathlib
import pkgutil
import warnings

import pytest
import torch
from torch import nn

import blockopt
from blockopt.kernels.blocks import Geometry

HF_REASON = "Hugging Face transformers is not installed (pip install blockopt[test])"


@pytest.fixture(scope="module")
def hf():
    return pytest.importorskip("transformers", reason=HF_REASON)


def _meta(cls, config):
    with torch.device("meta"):
        return cls(config)


def _quiet(model: nn.Module, **kw) -> blockopt.PartitionPlan:
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        plan = blockopt.partition(model, **kw)
    assert plan.warnings == ()
    return plan


def _layer(plan, prefix="model.layers.0."):
    return {n[len(prefix):]: e for n, e in plan.items() if n.startswith(prefix)}


COMMON = {"vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
              "max_position_embeddings": 16}


# --- mixture of experts ------------------------------------------------------------------------------
def test_golden_mixtral_experts_router(hf):
    # 4 experts, intermediate 48: gate_up [4, 96, 32], down [4, 32, 48]; router [4, 32]
    cfg = hf.MixtralConfig(intermediate_size=48, num_local_experts=4, num_experts_per_tok=2, **COMMON)
    layer = _layer(_quiet(_meta(hf.MixtralForCausalLM, cfg)))
    gate_up, down, router = layer["mlp.experts.gate_up_proj"], layer["mlp.experts.down_proj"], layer["mlp.gate.weight"]
    assert (gate_up.kind, gate_up.num_blocks) == ("stacked_row", 4 * 96)
    assert gate_up.geometry == Geometry(-1, ((4 * 96 * 32, 32),))  # runs of `in` elements
    assert (down.kind, down.num_blocks) == ("stacked_row", 4 * 32)
    assert gate_up.describe() == "stacked_row 4x96" and gate_up.role == "mlp" and gate_up.weight_decay
    assert (router.kind, router.num_blocks, router.role) == ("row", 4, "router")


def test_golden_qwen3_moe(hf):
    # 8 experts of 16: gate_up [8, 32, 32], down [8, 32, 16]
    cfg = hf.Qwen3MoeConfig(moe_intermediate_size=16, num_experts=8, num_experts_per_tok=2, head_dim=8, **COMMON)
    layer = _layer(_quiet(_meta(hf.Qwen3MoeForCausalLM, cfg)))
    assert (layer["mlp.experts.gate_up_proj"].kind, layer["mlp.experts.gate_up_proj"].num_blocks) == ("stacked_row", 8 * 32)
    assert (layer["mlp.experts.down_proj"].kind, layer["mlp.experts.down_proj"].num_blocks) == ("stacked_row", 8 * 32)
    assert (layer["mlp.gate.weight"].role, layer["mlp.gate.weight"].num_blocks) == ("router", 8)
    assert (layer["self_attn.q_proj.weight"].kind, layer["self_attn.q_proj.weight"].num_blocks) == ("head", 4)


def test_golden_qwen2_moe_shared_expert_per_row(hf):
    cfg = hf.Qwen2MoeConfig(moe_intermediate_size=16, shared_expert_intermediate_size=24, num_experts=8,
                            num_experts_per_tok=2, **COMMON)
    layer = _layer(_quiet(_meta(hf.Qwen2MoeForCausalLM, cfg)))
    for name, rows in (("gate_proj", 24), ("up_proj", 24), ("down_proj", 32)):
        e = layer[f"mlp.shared_expert.{name}.weight"]
        assert (e.kind, e.num_blocks, e.role) == ("row", rows, "mlp")
    assert layer["mlp.shared_expert_gate.weight"].num_blocks == 1  # [1, 32]: one row
    assert layer["mlp.experts.gate_up_proj"].num_blocks == 8 * 32


def test_golden_gpt_oss_transposed_experts_and_biases(hf):
    # is_transposed: gate_up [4, 32 (in), 32 (out)], down [4, 16 (in), 32 (out)]; biases [4, out]
    cfg = hf.GptOssConfig(intermediate_size=16, num_local_experts=4, num_experts_per_tok=2, head_dim=8,
                          layer_types=["full_attention"], **COMMON)
    layer = _layer(_quiet(_meta(hf.GptOssForCausalLM, cfg)))
    gate_up, down = layer["mlp.experts.gate_up_proj"], layer["mlp.experts.down_proj"]
    assert gate_up.geometry == Geometry(2, ((4 * 32, 1),)) and gate_up.kind == "stacked_column"
    assert (down.kind, down.num_blocks) == ("stacked_column", 4 * 32)
    assert "is_transposed=True" in down.rule
    for bias in ("gate_up_proj_bias", "down_proj_bias"):
        e = layer[f"mlp.experts.{bias}"]
        assert (e.kind, e.num_blocks, e.weight_decay) == ("element", 4 * 32, False)
    assert (layer["mlp.router.weight"].role, layer["mlp.router.weight"].num_blocks) == ("router", 4)
    assert layer["mlp.router.bias"].kind == "element"


class _Experts(nn.Module):
    """Stacked experts without transformers' ``is_transposed`` flag: the layout comes from the hidden size."""

    def __init__(self, transposed: bool, e: int = 5, hidden: int = 6, inter: int = 4) -> None:
        super().__init__()
        self.num_experts = e
        self.config = type("Cfg", (), {"hidden_size": hidden})()
        up, down = ((e, hidden, 2 * inter), (e, inter, hidden)) if transposed else ((e, 2 * inter, hidden), (e, hidden, inter))
        self.gate_up_proj = nn.Parameter(torch.zeros(up))
        self.down_proj = nn.Parameter(torch.zeros(down))


@pytest.mark.parametrize("transposed", [False, True], ids=["[E,out,in]", "[E,in,out]"])
def test_layout_without_the_flag_follows_the_hidden_size(transposed):
    plan = _quiet(_Experts(transposed))
    up, down = plan["gate_up_proj"], plan["down_proj"]
    assert up.num_blocks == 5 * 8 and down.num_blocks == 5 * 6  # experts x output neurons
    assert {up.kind, down.kind} == {"stacked_column" if transposed else "stacked_row"}


def _expert_classes():
    """Every experts class of the installed transformers (decorated with ``use_experts_implementation``)."""
    import transformers.models as family_pkg

    out = []
    for info in pkgutil.iter_modules(family_pkg.__path__):
        spec = importlib.util.find_spec(f"transformers.models.{info.name}.modeling_{info.name}")
        if spec is None or "use_experts_implementation" not in pathlib.Path(spec.origin).read_text(encoding="utf-8"):
            continue
        mod = importlib.import_module(spec.name)
        for _, cls in inspect.getmembers(mod, inspect.isclass):
            if cls.__module__ == mod.__name__ and issubclass(cls, nn.Module) and hasattr(cls, "_apply_gate"):
                out.append((info.name, cls))
    return out


def _build_experts(family: str, cls: type) -> nn.Module:
    """The experts module of a family on ``meta``, from its default (text) config; fails loudly."""
    from transformers import PretrainedConfig

    cfgmod = importlib.import_module(f"transformers.models.{family}.configuration_{family}")
    configs = [c for _, c in inspect.getmembers(cfgmod, inspect.isclass)
               if c.__module__ == cfgmod.__name__ and issubclass(c, PretrainedConfig)]
    configs.sort(key=lambda c: ("Vision" in c.__name__ or "Audio" in c.__name__, "Text" not in c.__name__))
    last = None
    for config_cls in configs:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                cfg = config_cls()
            for attr in ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"):
                if hasattr(cfg, attr) and getattr(cfg, attr) is None:  # MoE off by default: switch it on
                    setattr(cfg, attr, 4)
            if getattr(cfg, "moe_intermediate_size", 0) is None:
                cfg.moe_intermediate_size = 16
            kwargs = {}
            size = getattr(cfg, "moe_intermediate_size", None)
            if isinstance(size, (list, tuple)) and "intermediate_size" in inspect.signature(cls.__init__).parameters:
                kwargs["intermediate_size"] = size[0]  # one size per modality: the text experts'
            if "layer_idx" in inspect.signature(cls.__init__).parameters:
                kwargs["layer_idx"] = 0  # per-layer settings (e.g. bailing_hybrid's swiglu limits): the first layer's
            with torch.device("meta"):
                return cls(cfg, **kwargs)
        except Exception as e:  # noqa: BLE001 - try the next config class of the family
            last = e
    raise AssertionError(f"{family}: cannot build {cls.__name__} from any config of the family: {last!r}")


def test_every_stacked_expert_family_of_the_installed_transformers(hf):
    """Found by the test itself: a new family that blockopt misreads fails here, by name."""
    classes = _expert_classes()
    assert len(classes) >= 30, "the enumeration found too few experts classes: has transformers changed?"
    wrong = []
    for family, cls in classes:
        module = _build_experts(family, cls)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            plan = blockopt.partition(module)
        if any("matched no structural rule" in str(w.message) for w in caught):
            wrong.append(f"{family}.{cls.__name__}: unknown tensors {plan.warnings}")
            continue
        transposed = bool(getattr(module, "is_transposed", False))
        for name, p in module.named_parameters():
            e = plan[name]
            if p.dim() == 3:
                e_, a, b = p.shape
                want = ("stacked_column", e_ * b) if transposed else ("stacked_row", e_ * a)
                if (e.kind, e.num_blocks) != want:
                    wrong.append(f"{family}.{cls.__name__}.{name} {list(p.shape)}: {e.describe()}, want {want}")
            elif p.dim() == 2 and "bias" in name and e.kind != "element":
                wrong.append(f"{family}.{cls.__name__}.{name}: {e.describe()}, want per element")
    assert not wrong, "\n".join(wrong)


def test_overrides_can_say_per_expert_and_output_neuron():
    m = _Experts(False)
    plan = blockopt.partition(m, overrides={"gate_up_proj": "stacked_column", "down_proj": "stacked_row"})
    assert plan["gate_up_proj"].geometry == Geometry(2, ((5 * 6, 1),))
    assert plan["down_proj"].geometry == Geometry(-1, ((5 * 6 * 4, 4),))
    with pytest.raises(ValueError, match=r"stacked_row.*3-D.*'weight'.*\[4, 3\]"):
        blockopt.partition(nn.Linear(3, 4, bias=False), overrides={"weight": "stacked_row"})


def test_flattened_groups_are_shown_as_groups_not_as_one_tensor():
    plan = blockopt.partition(nn.Linear(6, 4, bias=False), overrides={"weight": "element"})
    e = blockopt.PlanEntry("w", (4, 6), Geometry(-1, ((24, 3),)), "other", "test", True)
    assert (e.kind, e.describe()) == ("group", "group of 3 x8")
    assert plan["weight"].describe() == "element x24"


def test_unknown_tensor_warning_of_a_large_model_is_short():
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.zeros(3, 4, 5, 6))

    class Big(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList(Odd() for _ in range(60))

    with pytest.warns(UserWarning, match="matched no structural rule") as record:
        blockopt.partition(Big())
    ours = [str(w.message) for w in record if "blockopt.partition" in str(w.message)]
    assert len(ours) == 1 and len(ours[0]) < 400, ours
    assert "60 tensor(s)" in ours[0] and "layers.*.w" in ours[0] and "(x60)" in ours[0]


# --- multi-head latent attention -----------------------------------------------------------------
def _deepseek(hf, q_lora_rank=16):
    cfg = hf.DeepseekV3Config(vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                              num_hidden_layers=2, first_k_dense_replace=1, num_attention_heads=4,
                              num_key_value_heads=4, n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2,
                              n_group=1, topk_group=1, q_lora_rank=q_lora_rank, kv_lora_rank=8, qk_rope_head_dim=4,
                              qk_nope_head_dim=8, v_head_dim=6)
    return _meta(hf.DeepseekV3ForCausalLM, cfg)


def test_golden_deepseek_v3_mla_and_experts(hf):
    plan = _quiet(_deepseek(hf))
    attn = _layer(plan, "model.layers.0.self_attn.")
    q_b = attn["q_b_proj.weight"]  # [4 heads x (8 nope + 4 rope), 16]
    assert q_b.geometry == Geometry(0, ((48, 12),)) and (q_b.kind, q_b.role) == ("head", "query")
    kv_b = attn["kv_b_proj.weight"]  # per head [k_nope 8 | v 6] rows
    assert kv_b.geometry == Geometry(0, ((8, 8), (6, 1)) * 4)
    assert kv_b.parts == ("key", "value") * 4 and kv_b.num_blocks == 4 * (1 + 6)
    assert kv_b.describe() == "fused (k:tensor x1 | v:row x6) x4"
    kv_a = attn["kv_a_proj_with_mqa.weight"]  # [8 latent | 4 rope key]
    assert kv_a.geometry == Geometry(0, ((8, 1), (4, 4)))
    assert (attn["q_a_proj.weight"].kind, attn["q_a_proj.weight"].num_blocks) == ("row", 16)
    assert (attn["o_proj.weight"].kind, attn["o_proj.weight"].role) == ("row", "attn_out")
    moe = _layer(plan, "model.layers.1.mlp.")
    assert moe["experts.gate_up_proj"].num_blocks == 4 * 32 and moe["gate.weight"].role == "router"
    assert (moe["shared_experts.down_proj.weight"].kind, moe["shared_experts.down_proj.weight"].num_blocks) == ("row", 32)


def test_mla_without_a_query_rank_keeps_heads_on_q_proj(hf):
    attn = _layer(_quiet(_deepseek(hf, q_lora_rank=None)), "model.layers.0.self_attn.")
    assert attn["q_proj.weight"].geometry == Geometry(0, ((48, 12),))


def test_blockwise_lr_of_mla_and_experts(hf):
    model = _deepseek(hf)
    types = blockopt.optim.blockwise_lr.blockwise_block_types(model, plan=blockopt.partition(model, warn=False))
    assert types["model.layers.0.self_attn.q_b_proj.weight"] == "qk"
    assert types["model.layers.0.self_attn.kv_b_proj.weight"] == "vo"  # key and value parts: the smaller
    assert types["model.layers.1.mlp.experts.gate_up_proj"] == "ffn"
    assert types["model.layers.1.mlp.gate.weight"] == "ffn"


# --- projections placed by order --------------------------------------------------------------------
class _Ordered(nn.Module):
    def __init__(self, with_count: bool) -> None:
        super().__init__()
        if with_count:
            self.num_heads = 4
        self.a, self.b, self.c, self.d = (nn.Linear(32, 32, bias=False) for _ in range(4))


class _Block(nn.Module):
    def __init__(self, with_count: bool) -> None:
        super().__init__()
        self.mixer = _Ordered(with_count)  # neither named nor typed as attention


@pytest.mark.parametrize("with_count, hints", [(True, {}), (True, {"num_heads": 4}), (False, {"num_heads": 4})],
                         ids=["module.num_heads", "module+hint", "hint on a module typed Attention"])
def test_head_count_applies_to_projections_placed_by_order(with_count, hints):
    if with_count:
        model = _Block(True)
        prefix = "mixer."
    else:
        class SelfAttention(_Ordered):
            pass
        model = nn.Module()
        model.attn = SelfAttention(False)
        prefix = "attn."
    plan = _quiet(model, **hints)
    assert plan[prefix + "a.weight"].geometry == Geometry(0, ((32, 8),))  # query: 4 heads of 8
    assert plan[prefix + "b.weight"].geometry == Geometry(0, ((32, 8),))  # key
    assert plan[prefix + "c.weight"].kind == "row" and plan[prefix + "c.weight"].role == "value"
    assert plan[prefix + "d.weight"].role == "attn_out"


def test_hint_message_when_attention_exists_but_no_query_fits():
    class Attention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.only = nn.Linear(8, 8)

    with pytest.warns(UserWarning, match="1 attention module"):
        blockopt.partition(Attention(), num_heads=2, warn=False)


# --- LoRA (peft) --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def peft_llama(hf):
    peft = pytest.importorskip("peft", reason="peft is not installed (pip install blockopt[test])")
    cfg = hf.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16)
    torch.manual_seed(0)
    model = hf.LlamaForCausalLM(cfg)
    lora = peft.LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj"])
    return peft.get_peft_model(model, lora)


def test_lora_adapters_take_their_layers_roles(peft_llama):
    plan = _quiet(peft_llama)
    attn = _layer(plan, "base_model.model.model.layers.0.self_attn.")
    for proj, role in (("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value"), ("o_proj", "attn_out")):
        for part in ("base_layer.weight", "lora_A.default.weight", "lora_B.default.weight"):
            assert attn[f"{proj}.{part}"].role == role, (proj, part)
    assert attn["q_proj.base_layer.weight"].geometry == Geometry(0, ((32, 8),))  # 4 heads of 8
    assert attn["q_proj.lora_B.default.weight"].geometry == Geometry(0, ((32, 8),))  # its rows are the heads
    assert attn["k_proj.lora_B.default.weight"].geometry == Geometry(0, ((16, 8),))
    assert attn["q_proj.lora_A.default.weight"].kind == "row"
    types = blockopt.optim.blockwise_lr.blockwise_block_types(peft_llama, plan=plan)
    prefix = "base_model.model.model.layers.0.self_attn."
    assert types[prefix + "q_proj.lora_B.default.weight"] == "qk"
    assert types[prefix + "v_proj.lora_A.default.weight"] == "vo"


def test_lora_plan_counts_only_what_trains_and_says_what_is_frozen(peft_llama):
    plan = blockopt.partition(peft_llama, warn=False)
    frozen = {n for n, p in peft_llama.named_parameters() if not p.requires_grad}
    assert frozen and {e.name for e in plan.entries if not e.trainable} == frozen
    opt = blockopt.AdamMini(peft_llama, rules="official", lr=1e-3)
    x = torch.randint(0, 64, (2, 8))
    peft_llama(input_ids=x, labels=x).loss.backward()
    opt.step()
    measured = sum(t.numel() * t.element_size() for s in opt.state.values() for k, t in s.items() if k != "step")
    assert measured == opt.plan.state_bytes() == plan.state_bytes()
    text = str(plan)
    assert "(frozen)" in text and f"({len(frozen)} frozen, not counted)" in text
    assert blockopt.PartitionPlan.from_json(plan.to_json()) == plan  # trainable survives the round trip
    peft_llama.zero_grad(set_to_none=True)


# --- compiled models ------------------------------------------------------------------------------------
def test_plan_of_a_compiled_model_uses_the_plain_names():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    compiled = torch.compile(model)
    assert next(n for n, _ in compiled.named_parameters()).startswith("_orig_mod.")
    plan = blockopt.partition(compiled)
    assert list(plan) == [n for n, _ in model.named_parameters()]
    assert plan["_orig_mod.0.weight"] is plan["0.weight"]
    assert math.prod(plan["0.weight"].shape) == 32
