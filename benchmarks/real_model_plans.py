"""Optimizer state of real models' plans against fp32 AdamW's, built from their configurations on the
``meta`` device (no download, no weights): the official rules, the built-in SNR table, and the
built-in table within a 0.55x state budget (``rules="blocks"``), and AdamMini's default (the same with
every matrix but the embeddings factored).

    python benchmarks/real_model_plans.py                 # a Markdown table (transformers needed)
"""

from __future__ import annotations

import argparse
import json
import warnings

from blockopt.bench.hf import build_hf_model, load_hf_config
from blockopt.partition import partition

# the public configurations' shapes (head counts, sizes, experts), written out so nothing is downloaded
CONFIGS = {
    "Llama-3-8B": {"model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
                   "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                   "max_position_embeddings": 8192, "tie_word_embeddings": False},
    "Qwen3-8B": {"model_type": "qwen3", "vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 12288,
                 "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
                 "max_position_embeddings": 40960, "tie_word_embeddings": False},
    "GPT-2 124M": {"model_type": "gpt2", "vocab_size": 50257, "n_embd": 768, "n_layer": 12, "n_head": 12,
                   "n_positions": 1024},
    "Qwen3-30B-A3B": {"model_type": "qwen3_moe", "vocab_size": 151936, "hidden_size": 2048,
                      "intermediate_size": 6144, "moe_intermediate_size": 768, "num_hidden_layers": 48,
                      "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128, "num_experts": 128,
                      "num_experts_per_tok": 8, "decoder_sparse_step": 1, "max_position_embeddings": 40960,
                      "tie_word_embeddings": False},
}

SETUPS = {"official rules": {}, "built-in SNR table": {"snr": "builtin"},
          "built-in table, state_budget=0.55 (rules='blocks')": {"snr": "builtin", "state_budget": 0.55},
          "**default**: the same, matrices factored": {"snr": "builtin", "factored": True, "state_budget": 0.55}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(CONFIGS))
    args = ap.parse_args()
    print("| model | parameters | " + " | ".join(SETUPS) + " |")
    print("|---|---|" + "---|" * len(SETUPS))
    for name in args.models.split(","):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = build_hf_model(load_hf_config(json.dumps(CONFIGS[name])), device="meta", seed=None)
        cells = []
        n = 0
        for kw in SETUPS.values():
            plan = partition(model, warn=False, **kw)
            n = plan.num_params
            cells.append(f"{plan.state_bytes() / plan.adamw_state_bytes():.4f}x")
        factored = sum(e.kind == "factored" for e in plan.entries)
        cells[-1] += f" ({factored} factored)"
        print(f"| {name} | {n / 1e9:.2f}B | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
