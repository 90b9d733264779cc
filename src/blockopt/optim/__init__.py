"""Optimizers built on a partition plan."""

from .adam_mini import AdamMini

__all__ = ["AdamMini"]
