"""Moved to :mod:`blockopt.models`; this module re-exports it so that old imports keep working."""

from __future__ import annotations

from ..models import *
from ..models import MLP, Attention, Block, RotaryEmbedding  # noqa: F401  (the building blocks, for old imports)

__all__ = ["MODEL_PRESETS", "ModelConfig", "TransformerLM", "build_model"]
