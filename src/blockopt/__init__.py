"""blockopt: Adam-mini and block-wise optimizers for PyTorch, with a structural partition engine."""

import sys

from . import models
from .kernels.blocks import Geometry
from .optim import (
    BLOCKWISE_LR_MULTIPLIERS,
    AdamMini,
    BackwardStep,
    MoFO,
    blockwise_block_types,
    blockwise_lr_groups,
    step_in_backward,
)
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
from .utils import lazy_submodules

# ``blockopt.partition.calibrate``, where 0.1.0 defined it, still names the function. It trains a model
# (with AdamMini when sampling), so it lives above the optimizers, which partition/ may not import.
sys.modules[f"{__name__}.partition"].calibrate = calibrate

__version__ = "0.2.0.dev0"

# Subpackages reachable as attributes (``blockopt.integrations.deepspeed.attach``) without importing
# them, or their optional dependencies, at ``import blockopt`` time: each is imported on first use.
_LAZY_SUBMODULES = frozenset({"bench", "cli", "distributed", "hessian", "integrations", "kernels", "memory", "optim",
                              "partition", "utils"})


__getattr__, __dir__ = lazy_submodules(__name__, _LAZY_SUBMODULES, globals())

__all__ = [
    "BLOCKWISE_LR_MULTIPLIERS",
    "BUILTIN_SNR_RULES",
    "AdamMini",
    "BackwardStep",
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
    "step_in_backward",
]
