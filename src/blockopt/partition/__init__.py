"""The partition engine: which parameter elements share one second moment."""

from .plan import KINDS, PartitionPlan, PlanEntry
from .rules import OVERRIDE_KINDS, partition

__all__ = ["KINDS", "OVERRIDE_KINDS", "PartitionPlan", "PlanEntry", "partition"]
