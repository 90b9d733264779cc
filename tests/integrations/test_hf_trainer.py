"""Hugging Face Trainer with AdamMini: optimizer, scheduler, training and checkpoint resume."""

from __future__ import annotations

import math
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="needs pip install 'blockopt[hf]'")
pytest.importorskip("accelerate", reason="the HF Trainer needs accelerate: pip install 'blockopt[hf]'")

import blockopt
from blockopt.integrations import hf as bhf

VOCAB, STEPS, WARMUP, LR = 97, 16, 4, 1e-2
SAVE = STEPS // 2


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   intermediate_size=64, vocab_size=VOCAB, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg)


class _Counting(torch.utils.data.Dataset):
    """Rows that count up from a random start with a random stride (mod VOCAB): learnable in a few steps."""

    def __init__(self, n: int = 64, seq: int = 24, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        start = torch.randint(0, VOCAB, (n, 1), generator=g)
        stride = torch.randint(1, 4, (n, 1), generator=g)
        self.rows = (start + stride * torch.arange(seq)) % VOCAB  # [n, seq]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.rows[i], "labels": self.rows[i]}


def _args(out, **kw):
    base = {"output_dir": str(out), "max_steps": STEPS, "per_device_train_batch_size": 8, "learning_rate": LR,
                "adam_beta1": 0.9, "adam_beta2": 0.95, "adam_epsilon": 1e-8, "weight_decay": 0.1, "warmup_steps": WARMUP,
                "lr_scheduler_type": "cosine", "logging_steps": 1, "save_strategy": "steps", "save_steps": SAVE, "report_to": [],
                "use_cpu": True, "disable_tqdm": True, "seed": 0, "dataloader_num_workers": 0}
    return transformers.TrainingArguments(**{**base, **kw})


class _Record(transformers.TrainerCallback):
    """The lr in each of the optimizer's groups as each step begins; exp_avg as training begins."""

    def __init__(self, opt: blockopt.AdamMini) -> None:
        self.opt, self.lrs, self.exp_avg_at_begin = opt, [], None

    def on_train_begin(self, args, state, control, **kw):
        self.exp_avg_at_begin = [self.opt.state[p]["exp_avg"].clone() if p in self.opt.state else None
                                 for p in self.opt.params_in_order()]

    def on_step_begin(self, args, state, control, **kw):
        self.lrs.append((state.global_step, [g["lr"] for g in self.opt.param_groups]))


def _trainer(model, args, opt):
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_Counting(), optimizers=(opt, None))
    trainer.remove_callback(transformers.trainer_callback.PrinterCallback)
    rec = _Record(opt)
    trainer.add_callback(rec)
    return trainer, rec


def _hf_cosine(step: int) -> float:
    # get_cosine_schedule_with_warmup, written out
    if step < WARMUP:
        return step / WARMUP
    return 0.5 * (1 + math.cos(math.pi * (step - WARMUP) / (STEPS - WARMUP)))


def test_trainer_trains_with_adam_mini_and_resumes(tmp_path):
    model = _model()
    args = _args(tmp_path / "a")
    opt = bhf.adam_mini_from_training_args(model, args, rules="official")  # the heads, from the config
    assert opt.defaults["lr"] == LR and opt.defaults["betas"] == (0.9, 0.95) and opt.defaults["weight_decay"] == 0.1
    # the plan, from the model's structure and config
    expected = blockopt.partition(model)
    assert {e.name: e.to_dict() for e in opt.plan.values()} == {e.name: e.to_dict() for e in expected.values()}
    q, k = opt.plan["model.layers.0.self_attn.q_proj.weight"], opt.plan["model.layers.0.self_attn.k_proj.weight"]
    assert (q.kind, q.num_blocks, k.kind, k.num_blocks) == ("head", 4, "head", 2)
    assert (opt.plan["lm_head.weight"].role, opt.plan["lm_head.weight"].num_blocks) == ("output", VOCAB)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    trainer, rec = _trainer(model, args, opt)
    trainer.train()
    # the Trainer stepped our optimizer (Accelerate wraps it)
    assert getattr(trainer.optimizer, "optimizer", trainer.optimizer) is opt
    assert trainer.state.global_step == STEPS
    # the Trainer's scheduler set the lr of our group at every step
    assert [s for s, _ in rec.lrs] == list(range(STEPS))
    for step, lrs in rec.lrs:
        assert lrs == pytest.approx([LR * _hf_cosine(step)], rel=1e-9, abs=1e-15), step
    for n, p in model.named_parameters():
        assert not torch.equal(p, before[n]), n
        assert opt.state[p]["block_exp_avg_sq"].numel() == opt.plan[n].num_blocks, n
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == STEPS
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert first > 4.0 and last < first - 1.0, losses
    final_a = {n: p.detach().clone() for n, p in model.named_parameters()}
    exp_avg_a = [opt.state[p]["exp_avg"].clone() for p in opt.params_in_order()]

    # resume from the half-way checkpoint with a fresh model and optimizer
    ckpt = tmp_path / "a" / f"checkpoint-{SAVE}"
    saved = torch.load(ckpt / "optimizer.pt", weights_only=True)
    assert "block_plan" in saved["param_groups"][0]
    model_b = _model()
    opt_b = bhf.adam_mini_from_training_args(model_b, _args(tmp_path / "b"), rules="official")
    trainer_b, rec_b = _trainer(model_b, _args(tmp_path / "b"), opt_b)
    trainer_b.train(resume_from_checkpoint=str(ckpt))
    # the optimizer state was restored before training went on
    restored = rec_b.exp_avg_at_begin
    assert len(restored) == len(saved["state"]) == len(exp_avg_a)
    for i, m in enumerate(restored):
        assert m is not None and torch.equal(m, saved["state"][i]["exp_avg"]), i
    assert [s for s, _ in rec_b.lrs] == list(range(SAVE, STEPS))
    for step, lrs in rec_b.lrs:
        assert lrs == pytest.approx([LR * _hf_cosine(step)], rel=1e-9), step
    # and the resumed run ends where the uninterrupted one did
    for n, p in model_b.named_parameters():
        torch.testing.assert_close(p, final_a[n], rtol=1e-6, atol=1e-7, msg=n)
    for a, b in zip(exp_avg_a, (opt_b.state[p]["exp_avg"] for p in opt_b.params_in_order())):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)


def test_trainer_builds_adam_mini_through_the_factory_hook(tmp_path):
    model = _model()
    args = _args(tmp_path, max_steps=2, save_strategy="no")
    try:
        cls_and_kwargs = bhf.adam_mini_cls_and_kwargs(args, value_single_block=True, rules="official")
    except ImportError as e:  # transformers 4.x: no optimizer factories
        pytest.skip(str(e))
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_Counting(),
                                   optimizer_cls_and_kwargs=cls_and_kwargs)
    trainer.remove_callback(transformers.trainer_callback.PrinterCallback)
    before = model.model.layers[0].self_attn.v_proj.weight.detach().clone()
    trainer.train()
    opt = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    assert isinstance(opt, blockopt.AdamMini)
    assert opt.defaults["lr"] == LR and opt.defaults["betas"] == (0.9, 0.95)
    v = opt.plan["model.layers.0.self_attn.v_proj.weight"]
    assert (v.kind, v.num_blocks) == ("tensor", 1)  # value_single_block reached the plan
    assert not torch.equal(model.model.layers[0].self_attn.v_proj.weight, before)


def test_errors(tmp_path):
    model = _model()
    args = _args(tmp_path)
    with pytest.raises(ValueError, match=r"\['lr'\].*TrainingArguments.learning_rate"):
        bhf.adam_mini_from_training_args(model, args, lr=1e-3)
    with pytest.raises(TypeError, match="Invalid args: expected a transformers.TrainingArguments, got dict"):
        bhf.adam_mini_from_training_args(model, {"learning_rate": 1e-3})
    with pytest.raises(TypeError, match="Invalid model"):
        bhf.adam_mini_from_training_args([model], args)
    with pytest.raises(TypeError, match="passes parameter groups"):
        bhf.AdamMiniFactory()([{"params": list(model.parameters())}], lr=1e-3)


def test_missing_transformers_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    with pytest.raises(ImportError, match=r"pip install 'blockopt\[hf\]'"):
        bhf.adam_mini_kwargs(object())
