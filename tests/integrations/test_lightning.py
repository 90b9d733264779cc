"""PyTorch Lightning: AdamMini from configure_optimizers, with a per-step scheduler and checkpoint resume."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

L = pytest.importorskip("lightning", reason="needs pip install 'blockopt[lightning]'")

from titan_model import ModelArgs, Transformer, next_token_loss

import blockopt

# Lightning 2.6's own use of a deprecated torch pytree API
pytestmark = pytest.mark.filterwarnings(r"ignore:.*isinstance\(treespec, LeafSpec\).*")

STEPS, WARMUP, LR, BATCH, ROWS = 16, 4, 1e-2, 8, 64  # ROWS / BATCH = 8 steps per epoch


def _warmup_cosine(step: int) -> float:
    if step < WARMUP:
        return (step + 1) / WARMUP
    return 0.5 * (1 + math.cos(math.pi * (step - WARMUP) / (STEPS - WARMUP)))


class LitLM(L.LightningModule):
    """The pattern of docs/integrations.md: AdamMini over the whole LightningModule, scheduler stepped every batch."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = Transformer(ModelArgs())
        self.losses: list[float] = []
        self.lrs: list[tuple[int, float]] = []
        self.exp_avg_at_start: list[torch.Tensor | None] = []
        self.after_step: list[torch.Tensor] = []  # all parameters, flattened, after each step

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        return next_token_loss(self.model, batch)

    def configure_optimizers(self):
        opt = blockopt.AdamMini(self, rules="official", lr=LR, betas=(0.9, 0.95), weight_decay=0.1)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _warmup_cosine)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # recording, for the test
    def on_train_start(self) -> None:
        opt = self.trainer.optimizers[0]
        self.exp_avg_at_start = [opt.state[p]["exp_avg"].clone() if p in opt.state else None
                                 for p in self.parameters()]

    def on_train_batch_start(self, batch, batch_idx) -> None:
        self.lrs.append((self.trainer.global_step, self.trainer.optimizers[0].param_groups[0]["lr"]))

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        self.losses.append(outputs["loss"].item())
        self.after_step.append(torch.cat([p.detach().flatten() for p in self.parameters()]))


def _data() -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(0)
    start = torch.randint(0, 97, (ROWS, 1), generator=g)
    stride = torch.randint(1, 4, (ROWS, 1), generator=g)
    rows = (start + stride * torch.arange(25)) % 97  # [ROWS, 25]: counting patterns
    return torch.utils.data.DataLoader(rows, batch_size=BATCH, shuffle=False)


class _SaveAt(L.Callback):
    def __init__(self, step: int, path) -> None:
        self.step, self.path = step, path

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)


def _fit(module: LitLM, max_steps: int, ckpt_path=None, callbacks=()) -> L.Trainer:
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        callbacks=list(callbacks))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(num_workers|does not have many workers).*")
        trainer.fit(module, _data(), ckpt_path=ckpt_path)
    return trainer


def test_configure_optimizers_trains_and_resumes(tmp_path):
    lit = LitLM()
    before = {n: p.detach().clone() for n, p in lit.named_parameters()}
    ckpt = tmp_path / "half.ckpt"
    trainer = _fit(lit, STEPS, callbacks=[_SaveAt(STEPS // 2, ckpt)])
    opt = trainer.optimizers[0]
    assert isinstance(opt, blockopt.AdamMini)
    # the plan of the LightningModule is the inner model's, under the "model." prefix
    inner = blockopt.partition(lit.model)
    assert sorted(opt.plan) == sorted("model." + n for n in inner)
    for n in inner:
        a, b = opt.plan["model." + n], inner[n]
        assert (a.geometry, a.role, a.weight_decay) == (b.geometry, b.role, b.weight_decay), n
    q, k = opt.plan["model.layers.0.attention.wq.weight"], opt.plan["model.layers.0.attention.wk.weight"]
    assert (q.kind, q.num_blocks, k.kind, k.num_blocks) == ("head", 4, "head", 2)
    assert opt.plan["model.output.weight"].role == "output"
    # Lightning stepped the scheduler every batch, and its lr reached our group
    assert trainer.global_step == STEPS
    assert [s for s, _ in lit.lrs] == list(range(STEPS))
    assert [lr for _, lr in lit.lrs] == pytest.approx([LR * _warmup_cosine(s) for s in range(STEPS)], rel=1e-12)
    for n, p in lit.named_parameters():
        assert not torch.equal(p, before[n]), n
        assert opt.state[p]["block_exp_avg_sq"].numel() == opt.plan[n].num_blocks, n
    first, last = sum(lit.losses[:3]) / 3, sum(lit.losses[-3:]) / 3
    assert first > 4.0 and last < first - 1.0, lit.losses

    # resume from the checkpoint saved half-way, in a fresh module and trainer
    saved = torch.load(ckpt, weights_only=False)["optimizer_states"][0]
    resumed = LitLM()
    resumed_trainer = _fit(resumed, STEPS, ckpt_path=ckpt)
    assert len(resumed.exp_avg_at_start) == len(saved["state"])
    for i, m in enumerate(resumed.exp_avg_at_start):
        assert m is not None and torch.equal(m, saved["state"][i]["exp_avg"]), i
    assert [s for s, _ in resumed.lrs] == list(range(STEPS // 2, STEPS))
    assert resumed_trainer.global_step == STEPS
    # and the resumed run retraces the uninterrupted one, step by step
    assert len(resumed.after_step) == STEPS - STEPS // 2
    for i, flat in enumerate(resumed.after_step):
        torch.testing.assert_close(flat, lit.after_step[STEPS // 2 + i], rtol=1e-6, atol=1e-7, msg=f"step {i}")
