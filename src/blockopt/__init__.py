"""blockopt: Adam-mini and block-wise optimizers for PyTorch, with a structural partition engine."""

from . import models
from .kernels.blocks import Geometry
from .optim import BLOCKWISE_LR_MULTIPLIERS, AdamMini, MoFO, blockwise_block_types, blockwise_lr_groups
from .partition import (
    BUILTIN_SNR_RULES,
    PartitionPlan,
    PlanEntry,
    SampledSNRMeter,
    SNRCalibration,
    SNRMeter,
    SNRRules,
    calibrate,
    partition,
)

__version__ = "0.1.0"

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
