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

__all__ = ["AdamMini", "MoFO", "BLOCKWISE_LR_MULTIPLIERS", "blockwise_block_types", "blockwise_lr_groups", "Geometry", "PartitionPlan", "PlanEntry", "partition", "calibrate",
           "SNRCalibration", "SNRMeter", "SampledSNRMeter", "SNRRules", "BUILTIN_SNR_RULES", "models", "__version__"]
