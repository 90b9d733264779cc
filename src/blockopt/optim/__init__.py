"""Optimizers built on a partition plan."""

from .adam_mini import AdamMini
from .mofo import MoFO
from .blockwise_lr import BLOCKWISE_LR_MULTIPLIERS, blockwise_block_types, blockwise_lr_groups

__all__ = ["AdamMini", "MoFO", "BLOCKWISE_LR_MULTIPLIERS", "blockwise_block_types", "blockwise_lr_groups"]
