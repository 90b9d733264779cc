"""blockopt: Adam-mini and block-wise optimizers for PyTorch, with a structural partition engine."""

from .kernels.blocks import Geometry
from .optim import AdamMini
from .partition import PartitionPlan, PlanEntry, partition

__version__ = "0.1.0"

__all__ = ["AdamMini", "Geometry", "PartitionPlan", "PlanEntry", "partition", "__version__"]
