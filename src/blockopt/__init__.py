"""blockopt: Adam-mini and block-wise optimizers for PyTorch, with a structural partition engine."""

import importlib
import sys
from typing import Any

from . import models
from .kernels.blocks import Geometry
from .optim import BLOCKWISE_LR_MULTIPLIERS, AdamMini, MoFO, blockwise_block_types, blockwise_lr_groups
from .optim.calibrate import calibrate
from .partition import (
    BUILTIN_SNR_RULES,
    PartitionPlan,
    PlanEntry,
    SampledSNRMeter,
    SNRCalibration,
    SNRMeter,
    SNRRules,
    partition,
)

# ``blockopt.partition.calibrate``, where 0.1.0 defined it, still names the function. It trains a model
# (with AdamMini when sampling), so it lives above the optimizers, which partition/ may not import.
sys.modules[f"{__name__}.partition"].calibrate = calibrate

__version__ = "0.1.0"

# Subpackages reachable as attributes (``blockopt.integrations.deepspeed.attach``) without importing
# them, or their optional dependencies, at ``import blockopt`` time: each is imported on first use.
_LAZY_SUBMODULES = frozenset({"bench", "cli", "distributed", "hessian", "integrations", "kernels", "optim",
                              "partition", "utils"})


def __getattr__(name: str) -> Any:
    if name in _LAZY_SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _LAZY_SUBMODULES)

__all__ = [
    "BLOCKWISE_LR_MULTIPLIERS",
    "BUILTIN_SNR_RULES",
    "AdamMini",
    "Geometry",
    "MoFO",
    "PartitionPlan",
    "PlanEntry",
    "SNRCalibration",
    "SNRMeter",
    "SNRRules",
    "SampledSNRMeter",
    "__version__",
    "blockwise_block_types",
    "blockwise_lr_groups",
    "calibrate",
    "models",
    "partition",
]
