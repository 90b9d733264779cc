"""Run `blockopt bench` with two extra Adam-mini variants registered, for the
tinyshakespeare gap study (benchmarks/shakespeare_gap.sh).

The `--optimizers name:key=value` syntax has no way to pass partition
`overrides`, so this wrapper adds, in this process only (use `--isolate none`:
spawned workers would not see them):

  adam-mini-embelem    Adam-mini with the (tied) embedding/head per element,
                       i.e. AdamW's v for that tensor (what the official
                       release does for embd/output layers)
  adam-mini-embtensor  Adam-mini with the embedding/head as one block

Usage: python benchmarks/shakespeare_variants.py bench ... --isolate none
"""

from __future__ import annotations

import sys

from blockopt.bench import optimizers as O
from blockopt.cli import main


def _variant(kind: str):
    def make(model, lr, hp, plan, info):
        from blockopt.optim import AdamMini

        return AdamMini(model, lr=lr, betas=(hp.beta1, hp.beta2), eps=hp.eps, weight_decay=hp.weight_decay,
                        value_single_block=hp.value_single_block, overrides={r"embed\.weight": kind})
    return make


for _name, _kind in (("adam-mini-embelem", "element"), ("adam-mini-embtensor", "tensor")):
    O.REGISTRY[_name] = O.OptimizerSpec(_name, f"Adam-mini (embed {_kind})", _variant(_kind), 3e-3,
                                        f"blockopt.AdamMini with overrides={{'embed.weight': '{_kind}'}}",
                                        options=O._ADAM_OPTS + ("value_single_block",))

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
