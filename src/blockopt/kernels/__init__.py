"""Pure step functions and block geometry. Knows nothing of models or optimizers."""

from .adam_mini import adam_mini_foreach, adam_mini_reference
from .blocks import Geometry, block_index, block_views, check_geometry

__all__ = [
    "Geometry",
    "adam_mini_foreach",
    "adam_mini_reference",
    "block_index",
    "block_views",
    "check_geometry",
]
