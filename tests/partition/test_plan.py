"""PartitionPlan mechanics: lookup, printing, JSON, meta device, state bytes."""

from __future__ import annotations

import json
import re

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import blockopt
from blockopt import PartitionPlan, PlanEntry
from blockopt.kernels.blocks import Geometry
from blockopt.models import build_model

HF_REASON = "Hugging Face transformers is not installed (pip install blockopt[test])"

# gpt2-tiny with one layer: vocab 256, d 128, 256 positions, 4 heads x 32, MLP 512, biases, tied head.
# parameters: embed 256*128 + wpe 256*128 = 65,536; ln_1/ln_2/final norm 3 * 256 = 768;
#   q/k/v/o 4 * (128*128 + 128) = 66,048; fc 512*128 + 512 = 66,048; proj 128*512 + 128 = 65,664
#   -> 264,064
# blocks: embed 256 + wpe 1 + 3 norms * (1 + 128) + q (4 + 128) + k (4 + 128) + v (128 + 128)
#   + o (128 + 128) + fc (512 + 512) + proj (128 + 128) = 2,700
TINY_PARAMS = 264_064
TINY_BLOCKS = 2_700


def _tiny(device="cpu"):
    return build_model("gpt2-tiny", n_layers=1, device=device)


class _Recorder(TorchDispatchMode):
    """Records every ATen op that runs (on any device) while active."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


class _Mixed(nn.Module):
    """A fused MHA, a tied head, an unknown tensor (so the plan carries a warning)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(12, 8)
        self.attn = nn.MultiheadAttention(8, 2)
        self.table = nn.Parameter(torch.zeros(3, 8))
        self.head = nn.Linear(8, 12, bias=False)
        self.head.weight = self.embed.weight

    def get_input_embeddings(self):
        return self.embed

    def get_output_embeddings(self):
        return self.head


# ---------------------------------------------------------------------------
# lookup


def test_plan_is_a_mapping_keyed_by_named_parameters():
    model = _tiny()
    plan = blockopt.partition(model)
    names = [n for n, _ in model.named_parameters()]  # tied lm_head.weight appears once, as embed.weight
    assert list(plan) == names
    assert len(plan) == len(names) == 20
    for name, p in model.named_parameters():
        e = plan[name]
        assert isinstance(e, PlanEntry)
        assert e.name == name and e.shape == tuple(p.shape)
    assert plan.num_params == TINY_PARAMS == sum(p.numel() for p in model.parameters())
    assert plan.num_blocks == TINY_BLOCKS


def test_alias_lookup():
    plan = blockopt.partition(_tiny())
    assert "lm_head.weight" in plan
    assert "lm_head.weight" not in list(plan)
    assert plan["lm_head.weight"] is plan["embed.weight"]
    assert plan["embed.weight"].aliases == ("lm_head.weight",)


def test_missing_name_keyerror_message():
    plan = blockopt.partition(_tiny())
    assert "nope.weight" not in plan
    with pytest.raises(KeyError) as info:
        plan["nope.weight"]
    message = str(info.value)
    assert "'nope.weight'" in message
    assert f"{len(plan)} entries" in message
    assert "embed.weight" in message  # shows what names look like


# ---------------------------------------------------------------------------
# printing


def test_print_shows_table_totals_and_state_ratio(capsys):
    plan = blockopt.partition(_tiny())
    print(plan)
    out = capsys.readouterr().out
    for name in plan:
        assert name in out
    assert "embed.weight (= lm_head.weight)" in out
    assert "head x4" in out and "row x512" in out and "element x128" in out
    totals = f"20 tensors, {TINY_PARAMS:,} parameters, {TINY_BLOCKS:,} second-moment values (AdamW: {TINY_PARAMS:,})"
    assert totals in out
    # (N + B) / 2N = 266,764 / 528,128 = 0.5051...
    ratio = (TINY_PARAMS + TINY_BLOCKS) / (2 * TINY_PARAMS)
    assert f"{ratio:.3f}" == "0.505"
    assert re.search(r"fp32 state: 1\.0 MiB vs AdamW 2\.0 MiB \(0\.505x\)", out)
    assert "blocks by kind: element 1,536, head 8, row 1,152, tensor 4" in out
    assert str(plan) == plan.table()
    assert repr(plan) == f"PartitionPlan(20 tensors, {TINY_PARAMS:,} parameters, {TINY_BLOCKS:,} blocks)"


def test_print_lists_warnings():
    plan = blockopt.partition(_Mixed(), warn=False)
    assert len(plan.warnings) == 1 and "table" in plan.warnings[0]
    assert f"warning: {plan.warnings[0]}" in str(plan)


def test_counts_by_kind():
    plan = blockopt.partition(_tiny())
    # element: 3 norm biases + q/k/v/o biases (7 * 128) + fc bias 512 + proj bias 128 = 1,536
    # head: q 4 + k 4; row: embed 256 + v 128 + o 128 + fc 512 + proj 128 = 1,152; tensor: wpe + 3 norms
    assert plan.counts() == {"element": 1536, "head": 8, "row": 1152, "tensor": 4}
    assert sum(plan.counts().values()) == plan.num_blocks


# ---------------------------------------------------------------------------
# JSON


@pytest.mark.parametrize(
    "make, kwargs",
    [
        (_tiny, {}),
        (_tiny, {"value_single_block": True, "overrides": {r".*fc\.weight": {"kind": "head", "head_dim": 8},
                                                         r"wpe\.weight": "row"}}),
        (_Mixed, {"warn": False}),
    ],
    ids=["gpt2-tiny", "gpt2-tiny-options", "mixed"],
)
def test_json_round_trip(tmp_path, make, kwargs):
    plan = blockopt.partition(make(), **kwargs)
    text = plan.to_json()
    data = json.loads(text)
    assert [e["name"] for e in data["entries"]] == list(plan)
    for d in data["entries"]:  # derived fields, for readers
        assert d["kind"] == plan[d["name"]].kind and d["num_blocks"] == plan[d["name"]].num_blocks
    back = PartitionPlan.from_json(text)
    assert back == plan
    assert back.entries == plan.entries
    assert dict(back.options) == dict(plan.options)
    assert back.warnings == plan.warnings
    assert back.to_json() == text
    path = tmp_path / "plan.json"
    plan.save(path)
    loaded = PartitionPlan.load(path)
    assert loaded == plan and loaded.warnings == plan.warnings and dict(loaded.options) == dict(plan.options)
    if "overrides" in kwargs:
        assert loaded.options["value_single_block"] is True
        assert loaded.options["overrides"][r"wpe\.weight"] == "row"
        assert loaded[r"blocks.0.mlp.fc.weight"].geometry == Geometry(0, ((512, 8),))


def test_json_keeps_fused_parts_and_aliases():
    plan = blockopt.partition(_Mixed(), warn=False)
    back = PartitionPlan.from_json(plan.to_json())
    e = back["attn.in_proj_weight"]
    assert e.parts == ("query", "key", "value")
    assert e.geometry == Geometry(0, ((8, 4), (8, 4), (8, 1)))
    assert back["head.weight"] is back["embed.weight"]


def test_different_plans_are_not_equal():
    model = _tiny()
    assert blockopt.partition(model) != blockopt.partition(model, value_single_block=True)


def _entries_json():
    return json.loads(blockopt.partition(_tiny()).to_json())


@pytest.mark.parametrize(
    "corrupt, match",
    [
        (lambda d: d["entries"][0].pop("segments"), r"lacks the field 'segments'"),
        (lambda d: d.update(format=2), r"format 2"),
        (lambda d: d.pop("entries"), r"not a blockopt plan"),
        (lambda d: d["entries"][0].update(segments=[[255, 1]]), r"cover 255 indices"),
        (lambda d: d["entries"][1].update(name=d["entries"][0]["name"]), r"appears twice"),
        (lambda d: d["entries"][1].update(name="lm_head.weight"), r"appears twice"),
    ],
    ids=["missing-field", "format", "no-entries", "bad-geometry", "duplicate", "duplicate-alias"],
)
def test_from_json_rejects_corrupt_plans(corrupt, match):
    data = _entries_json()
    corrupt(data)
    with pytest.raises(ValueError, match=match):
        PartitionPlan.from_json(json.dumps(data))


# ---------------------------------------------------------------------------
# meta device: no parameter-sized memory


def test_meta_device_plan_allocates_nothing():
    model = build_model("gpt2-160m", device="meta")  # 163M parameters, on meta
    with _Recorder() as rec:
        plan = blockopt.partition(model)
    assert rec.ops == []  # not a single tensor op: shapes and module types only
    assert all(p.is_meta for p in model.parameters())
    assert plan.num_params == sum(p.numel() for p in model.parameters())


def test_meta_and_cpu_plans_are_equal():
    meta = blockopt.partition(_tiny("meta"))
    cpu = blockopt.partition(_tiny("cpu"))
    assert meta == cpu
    model = _tiny("cpu")
    with _Recorder() as rec:
        blockopt.partition(model)
    assert rec.ops == []


# ---------------------------------------------------------------------------
# state bytes


def test_state_bytes_formula_matches_real_optimizer_state():
    """plan.state_bytes() / adamw_state_bytes() equal what AdamMini and AdamW actually allocate."""
    gen = torch.Generator().manual_seed(0)

    def state_bytes(opt_cls, model):
        opt = opt_cls(model, lr=1e-3, rules="official") if opt_cls is blockopt.AdamMini else opt_cls(model.parameters(), lr=1e-3)
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
        return sum(t.numel() * t.element_size() for s in opt.state.values() for k, t in s.items()
                   if torch.is_tensor(t) and k != "step")

    model = _tiny()
    plan = blockopt.partition(model)
    assert state_bytes(torch.optim.AdamW, model) == plan.adamw_state_bytes() == 8 * TINY_PARAMS
    assert state_bytes(blockopt.AdamMini, model) == plan.state_bytes() == 4 * (TINY_PARAMS + TINY_BLOCKS)


def _gpt2_small_ratio(model: nn.Module) -> float:
    plan = blockopt.partition(model)
    n = sum(p.numel() for p in model.parameters())  # unique parameters: a tied head counts once
    adamw = 2 * 4 * n  # exp_avg + exp_avg_sq, fp32
    assert plan.num_params == n
    assert plan.adamw_state_bytes() == adamw
    assert plan.state_bytes() == 4 * (n + plan.num_blocks)
    return plan.state_bytes() / adamw


def test_gpt2_small_state_bytes_builtin():
    model = build_model("gpt2-160m", device="meta")  # d 768, 12 layers, 12 heads, vocab 50257, untied
    assert _gpt2_small_ratio(model) <= 0.51


def test_gpt2_small_state_bytes_hf():
    hf = pytest.importorskip("transformers", reason=HF_REASON)
    with torch.device("meta"):
        model = hf.GPT2LMHeadModel(hf.GPT2Config(n_embd=768, n_layer=12, n_head=12))
    plan = blockopt.partition(model)
    assert plan["lm_head.weight"] is plan["transformer.wte.weight"]
    # per layer: c_attn 12 + 12 + 768 = 792, attn c_proj 768, c_fc 3072, mlp c_proj 768, 2 norms 2,
    #   biases 2304 + 768 + 3072 + 768 + 2 * 768 = 8448 -> 13,850; 12 layers = 166,200
    # + wte 50,257 + wpe 1 + ln_f (1 + 768) = 217,227
    assert plan.num_blocks == 12 * 13_850 + 50_257 + 1 + 769
    assert _gpt2_small_ratio(model) <= 0.51
