"""Optimizers built on a partition plan."""

from .adam_mini import AdamMini
from .blockwise_lr import BLOCKWISE_LR_MULTIPLIERS, blockwise_block_types, blockwise_lr_groups

__all__ = ["AdamMini", "BLOCKWISE_LR_MULTIPLIERS", "blockwise_block_types", "blockwise_lr_groups"]
