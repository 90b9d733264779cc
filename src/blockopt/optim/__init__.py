"""Optimizers built on a partition plan."""

from .adam_mini import AdamMini
from .blockwise_lr import BLOCKWISE_LR_MULTIPLIERS, blockwise_block_types, blockwise_lr_groups
from .mofo import MoFO

__all__ = ["BLOCKWISE_LR_MULTIPLIERS", "AdamMini", "MoFO", "blockwise_block_types", "blockwise_lr_groups"]
