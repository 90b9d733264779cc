"""The partition engine: which parameter elements share one second moment.

(``blockopt.calibrate``, which trains a model to measure SNRs, is :mod:`blockopt.optim.calibrate`.)
"""

from .plan import KINDS, PartitionPlan, PlanEntry
from .rules import OVERRIDE_KINDS, partition
from .snr import BUILTIN_SNR_RULES, SampledSNRMeter, SNRCalibration, SNRMeter, SNRRules, block_snr

__all__ = [
           "BUILTIN_SNR_RULES",
           "KINDS",
           "OVERRIDE_KINDS",
           "PartitionPlan",
           "PlanEntry",
           "SNRCalibration",
           "SNRMeter",
           "SNRRules",
           "SampledSNRMeter",
           "block_snr",
           "partition",
]
