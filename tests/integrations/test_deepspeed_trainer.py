"""Hugging Face Trainer + DeepSpeed ZeRO-2 on CPU with AdamMini (blockopt.integrations.deepspeed):
a tiny Llama trains, and the steps are AdamMini's ZeRO steps."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install 'blockopt[deepspeed]')")
pytest.importorskip("transformers", reason="transformers is not installed (pip install 'blockopt[hf]')")

SCRIPT = textwrap.dedent("""
    import json
    import deepspeed.ops, torch, transformers as hf
    deepspeed.ops.__compatible_ops__ = {}  # no shared-memory allreduce op to build (tests/distributed/dist_helpers.py)
    from blockopt.integrations import deepspeed as bds, hf as bhf
    torch.manual_seed(0)
    cfg = hf.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    model = hf.LlamaForCausalLM(cfg)
    g = torch.Generator().manual_seed(1)
    data = [{"input_ids": torch.randint(0, 64, (16,), generator=g)} for _ in range(32)]
    for row in data:
        row["labels"] = row["input_ids"].clone()
    ds_config = {"zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True,
                 "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                 "train_batch_size": "auto"}
    args = hf.TrainingArguments(output_dir=OUT, per_device_train_batch_size=4, max_steps=8, learning_rate=3e-3,
                                report_to=[], use_cpu=True, logging_steps=1, save_strategy="no",
                                deepspeed=ds_config)
    trainer = hf.Trainer(model=model, args=args, train_dataset=data,
                         optimizer_cls_and_kwargs=bhf.adam_mini_cls_and_kwargs(args),
                         callbacks=[bds.trainer_callback()])
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    opt = trainer.model_wrapped.optimizer.optimizer
    print("RESULT " + json.dumps({"engine": type(trainer.model_wrapped).__name__, "optimizer": type(opt).__name__,
                                  "routes": sorted(set(opt.routes.values())), "losses": losses}))
""")


def test_trainer_with_deepspeed_zero2_trains_a_tiny_llama_with_adam_mini(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(f"OUT = {str(tmp_path / 'out')!r}\n" + SCRIPT)
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29571"}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=600,
                          check=False)
    line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT")), None)
    assert line is not None, done.stdout[-2000:] + done.stderr[-4000:]
    result = json.loads(line[len("RESULT "):])
    assert result["engine"] == "DeepSpeedEngine" and result["optimizer"] == "AdamMini"
    assert result["routes"] == ["zero"]  # every step went through AdamMini's ZeRO-1/2 path
    assert len(result["losses"]) == 8 and result["losses"][-1] < result["losses"][0]
