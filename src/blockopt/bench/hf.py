"""Causal LMs from a Hugging Face config (``--hf-config``): built from the config, never downloaded.

``--hf-config`` is a path to a ``config.json`` (or a folder holding one) or an
inline JSON object with a ``model_type``, e.g.
``'{"model_type": "llama", "hidden_size": 256, "num_hidden_layers": 4, ...}'``.
Nothing is fetched from the Hub: a name that is neither a file nor JSON is an error.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..utils import load_hf_config as _load
from ..utils import one_line
from .errors import BenchInputError

__all__ = ["build_hf_model", "hf_attention_shape", "load_hf_config"]


def _transformers():
    try:
        import transformers
    except ImportError:
        raise BenchInputError("--hf-config needs the package 'transformers': pip install 'blockopt[hf]'") from None
    return transformers


def load_hf_config(spec: str, *, vocab_size: int | None = None) -> Any:
    """A ``transformers.PretrainedConfig`` from a file, a folder or inline JSON (no download)."""
    cfg, _ = _load(spec, BenchInputError)
    try:
        if vocab_size is not None:
            cfg.vocab_size = vocab_size
        cfg.use_cache = False
    except Exception as e:  # noqa: BLE001 - the config's own validation, whatever its class
        raise BenchInputError(f"--hf-config: {one_line(e)}") from None
    return cfg


def hf_max_positions(cfg: Any) -> int | None:
    for k in ("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len", "seq_length"):
        v = getattr(cfg, k, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def hf_attention_shape(cfg: Any) -> tuple[int, int, int]:
    """``(hidden, heads, kv_heads)`` read from the config's common attribute names."""
    hidden = next((getattr(cfg, k) for k in ("hidden_size", "n_embd", "d_model", "dim") if getattr(cfg, k, None)), 0)
    heads = next((getattr(cfg, k) for k in ("num_attention_heads", "n_head", "n_heads") if getattr(cfg, k, None)), 1)
    kv = next((getattr(cfg, k) for k in ("num_key_value_heads", "n_kv_heads", "multi_query_group_num")
               if getattr(cfg, k, None)), heads)
    return int(hidden), int(heads), int(kv)


def build_hf_model(cfg: Any, *, device: str | torch.device = "cpu", seed: int | None = 0) -> nn.Module:
    """``AutoModelForCausalLM.from_config(cfg)``; on ``meta`` nothing is allocated. The seed
    is drawn on CPU so that every device starts from the same weights."""
    transformers = _transformers()
    device = torch.device(device)
    try:
        if device.type == "meta":
            with torch.device("meta"):
                return transformers.AutoModelForCausalLM.from_config(cfg)
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            model = transformers.AutoModelForCausalLM.from_config(cfg)
    except ValueError as e:
        raise BenchInputError(f"--hf-config: transformers cannot build a causal LM from it: {e}") from None
    return model.to(device)

