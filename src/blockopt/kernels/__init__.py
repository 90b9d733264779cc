"""Pure step functions and block geometry. Knows nothing of models or optimizers."""

from .adam_mini import adam_mini_foreach, adam_mini_reference
from .adam_mini_cpu import adam_mini_fused_cpu, cpu_kernel_error, fused_cpu_supports, load_cpu_kernel, step_table
from .blocks import Geometry, block_index, block_views, check_geometry

__all__ = [
    "Geometry",
    "adam_mini_foreach",
    "adam_mini_fused_cpu",
    "adam_mini_reference",
    "block_index",
    "block_views",
    "check_geometry",
    "cpu_kernel_error",
    "fused_cpu_supports",
    "load_cpu_kernel",
    "step_table",
]
