"""The partition engine: which parameter elements share one second moment."""

from .plan import KINDS, PartitionPlan, PlanEntry
from .rules import OVERRIDE_KINDS, partition
from .snr import BUILTIN_SNR_RULES, SampledSNRMeter, SNRCalibration, SNRMeter, SNRRules, block_snr
from .calibrate import calibrate

__all__ = ["KINDS", "OVERRIDE_KINDS", "PartitionPlan", "PlanEntry", "partition", "calibrate", "block_snr",
           "BUILTIN_SNR_RULES", "SNRCalibration", "SNRMeter", "SNRRules", "SampledSNRMeter"]
