"""Table for benchmarks/lean_quality.sh: llama-tiny, default corpus, 1,200 steps, 3 seeds; each setup at
its best lr (lowest mean over seeds of the final held-out loss, the bench's rule), the per-seed losses,
the gap to AdamW fp32 (mean of per-seed gaps to AdamW at its own best lr) and the optimizer state at its
peak against AdamW's (the bench counts every state tensor, the int8 weight remainder included).

    python benchmarks/lean_quality_table.py [benchmarks/results/lean_quality]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import default_quality_table as dq  # the same loading and best-lr rule

D = "adam-mini-default"
LABELS = {
    "adamw": "AdamW, fp32 weights",
    D: "AdamMini default, fp32 weights and momentum",
    f"{D}:momentum_dtype=int8": "+ int8 momentum",
    f"{D}:weights=bf16-sr": "+ bf16 weights, stochastic rounding",
    f"{D}:weights=bf16+int8": "+ bf16 weights with an int8 remainder",
    f"{D}:step_in_backward=true": "+ step in backward (clip by the previous norm)",
    f"{D}:momentum_dtype=int8:step_in_backward=true:weights=bf16-sr":
        "**leanest**: int8 momentum + bf16-sr weights + step in backward",
}


def main() -> None:
    res = Path(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/lean_quality")
    dq.LABELS = LABELS
    print("\n".join(dq.table(res, "L", "llama-tiny, default corpus, 1,200 steps, 3 seeds, own lr sweep")))


if __name__ == "__main__":
    main()
