"""Optimizers built on a partition plan."""

from .adam_mini import AdamMini
from .backward_step import BackwardStep, step_in_backward
from .blockwise_lr import BLOCKWISE_LR_MULTIPLIERS, blockwise_block_types, blockwise_lr_groups
from .mofo import MoFO

__all__ = ["BLOCKWISE_LR_MULTIPLIERS", "AdamMini", "BackwardStep", "MoFO", "blockwise_block_types",
           "blockwise_lr_groups", "step_in_backward"]
