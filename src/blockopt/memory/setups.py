"""The setups ``blockopt memory`` compares (``--setups``), and the models it measures (``--model``).

A setup is an optimizer with its options, written ``name`` or ``name:key=value:key=value``:

* ``adamw``: ``torch.optim.AdamW(fused=True)`` on fp32 weights; ``adamw-autocast``: the same, with
  the forward and the loss under ``torch.autocast(dtype=torch.bfloat16)``;
* ``adamw8bit-bnb``, ``adamw8bit-torchao``: the 8-bit AdamW of bitsandbytes and of torchao (optional
  packages, not installed by any extra);
* ``adam-mini-official``: the official release, ``adam_mini.Adam_mini`` (the ``official`` extra);
* ``adam-mini``: ``blockopt.AdamMini(model)``, the default plan, with options ``momentum=fp32|bf16|int8``
  (``momentum_dtype``), ``weights=fp32|bf16-sr|bf16+int8|bf16+int16`` (the optimizer keeps bf16
  weights and its own extra bits) and ``step_in_backward=true|false`` (:func:`blockopt.step_in_backward`);
* ``lean``: ``adam-mini:momentum=int8:weights=bf16-sr:step_in_backward=true``.

Parsing checks names and options only (:class:`~blockopt.bench.errors.BenchInputError`, naming
``--setups``); a package that is missing is found when the setup runs, and gives an error record.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..bench.errors import BenchInputError
from ..utils import one_line

__all__ = ["LR", "SETUP_NAMES", "WEIGHT_DECAY", "ModelSource", "Setup", "SetupUnavailable", "build_optimizer",
           "first_line", "parse_setups", "resolve_model"]

LR, WEIGHT_DECAY = 1e-4, 0.1
MOMENTUM = ("fp32", "bf16", "int8")
WEIGHTS = ("fp32", "bf16-sr", "bf16+int8", "bf16+int16")
_BOOL = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
LEAN = "adam-mini:momentum=int8:weights=bf16-sr:step_in_backward=true"

#: name -> (import name, pip name) of the optional package it needs, or None
SETUP_NAMES: dict[str, tuple[str, str] | None] = {
    "adamw": None,
    "adamw-autocast": None,
    "adamw8bit-bnb": ("bitsandbytes", "bitsandbytes"),
    "adamw8bit-torchao": ("torchao", "torchao"),
    "adam-mini-official": ("adam_mini", "adam-mini"),
    "adam-mini": None,
    "lean": None,
}
_PIP_HINT = {"adam_mini": "pip install 'blockopt[official]'"}


class SetupUnavailable(Exception):
    """A setup that cannot run here (a missing package, an option this version lacks, a failure on this
    device); its message becomes the record's ``error``."""


@dataclass(frozen=True)
class Setup:
    """One entry of ``--setups``: ``text`` as given (the record's ``setup``), and what it means."""

    text: str
    name: str  # one of SETUP_NAMES but "lean"
    momentum: str = "fp32"
    weights: str = "fp32"
    step_in_backward: bool = False

    @property
    def package(self) -> tuple[str, str] | None:
        return SETUP_NAMES[self.name]

    @property
    def autocast(self) -> bool:
        return self.name == "adamw-autocast"

    def missing(self) -> str | None:
        """``None`` when the package it needs can be found, else the record's error (names what to install)."""
        if self.package is None:
            return None
        module, pip = self.package
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if found:
            return None
        return f"{self.text} needs the package {pip!r}: {_PIP_HINT.get(module, f'pip install {pip}')}"


def _allowed() -> str:
    return ("adamw, adamw-autocast, adamw8bit-bnb, adamw8bit-torchao, adam-mini-official, "
            f"adam-mini[:momentum={'|'.join(MOMENTUM)}][:weights={'|'.join(WEIGHTS)}][:step_in_backward=true|false], "
            f"lean ({LEAN})")


def parse_setups(text: str | Sequence[str]) -> list[Setup]:
    """``"adamw,adam-mini:momentum=int8,lean"`` (or a list of such entries) -> setups, in order.

    Raises :class:`~blockopt.bench.errors.BenchInputError` naming ``--setups``, the bad entry and what is
    allowed, before anything runs.
    """
    items = text.split(",") if isinstance(text, str) else [x for t in text for x in str(t).split(",")]
    items = [t.strip() for t in items if t.strip()]
    if not items:
        raise BenchInputError(f"--setups: {text!r} names no setup; allowed: {_allowed()}")
    return [_parse_one(t) for t in items]


def _parse_one(text: str) -> Setup:
    name, *opts = [t.strip() for t in (LEAN if text.lower() == "lean" else text).split(":")]
    name = name.lower()
    if name not in SETUP_NAMES or name == "lean":
        raise BenchInputError(f"--setups: unknown setup {text!r}; allowed: {_allowed()}")
    if opts and name != "adam-mini":
        raise BenchInputError(f"--setups: {text!r}: {name} takes no options; allowed (adam-mini only): "
                              f"momentum={'|'.join(MOMENTUM)}, weights={'|'.join(WEIGHTS)}, "
                              "step_in_backward=true|false")
    kw: dict[str, Any] = {}
    for o in opts:
        key, sep, value = (s.strip() for s in o.partition("="))
        value = value.lower()
        if key == "momentum" and sep and value in MOMENTUM:
            kw["momentum"] = value
        elif key == "weights" and sep and value in WEIGHTS:
            kw["weights"] = value
        elif key == "step_in_backward" and sep and value in _BOOL:
            kw["step_in_backward"] = _BOOL[value]
        else:
            raise BenchInputError(f"--setups: {text!r}: bad option {o!r}; allowed: momentum={'|'.join(MOMENTUM)}, "
                                  f"weights={'|'.join(WEIGHTS)}, step_in_backward=true|false")
    return Setup(text, name, **kw)


# --- models ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelSource:
    """``--model``: a built-in preset or a transformers config (a ``config.json``, a folder, inline JSON)."""

    spec: str
    hf: bool
    d_model: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    max_len: int | None

    def build(self, device: str | torch.device, seed: int | None = 0) -> nn.Module:
        """The model on ``device`` (``meta``: nothing allocated), initialised from ``seed``."""
        if self.hf:
            from ..bench.hf import build_hf_model

            return build_hf_model(self._hf_config(), device=device, seed=seed)
        from ..models import build_model

        return build_model(self.spec, device=device, seed=seed)

    def _hf_config(self) -> Any:
        from ..bench.hf import load_hf_config

        try:
            return load_hf_config(self.spec)
        except BenchInputError as e:
            raise BenchInputError(str(e).replace("--hf-config", "--model", 1)) from None

    def loss(self, model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
        """The mean next-token loss of ``tokens`` ``[batch, seq + 1]``."""
        if self.hf:
            x = tokens[:, :-1]
            return model(input_ids=x, labels=x).loss
        return model(tokens[:, :-1], tokens[:, 1:])


def resolve_model(spec: str) -> ModelSource:
    """``--model``: a name of :data:`blockopt.models.MODEL_PRESETS`, else a transformers config (needs the
    ``hf`` extra). Raises :class:`~blockopt.bench.errors.BenchInputError` naming ``--model``."""
    from ..models import MODEL_PRESETS

    if spec in MODEL_PRESETS:
        cfg = MODEL_PRESETS[spec]
        return ModelSource(spec, False, cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.vocab_size, cfg.max_seq_len)
    text = spec.strip()
    looks_like_path = text.startswith("{") or text.endswith(".json") or any(c in text for c in "/\\") \
        or Path(text).expanduser().exists()
    if not looks_like_path:
        raise BenchInputError(f"--model: unknown model {spec!r}; expected a built-in model ({', '.join(MODEL_PRESETS)}) "
                              "or a transformers config.json, a folder holding one, or inline JSON")
    if importlib.util.find_spec("transformers") is None:
        raise BenchInputError(f"--model {spec}: a transformers config needs the package 'transformers': "
                              "pip install 'blockopt[hf]'")
    from ..bench.hf import hf_attention_shape, hf_max_positions

    src = ModelSource(spec, True, 0, 0, 0, 0, None)
    cfg = src._hf_config()
    hidden, heads, kv = hf_attention_shape(cfg)
    return ModelSource(spec, True, hidden, heads, kv, int(cfg.vocab_size), hf_max_positions(cfg))


# --- optimizers -----------------------------------------------------------------------------------
def build_optimizer(setup: Setup, model: nn.Module, src: ModelSource) -> tuple[Any, Any]:
    """``(optimizer, step_in_backward handle or None)`` for ``model``; :class:`SetupUnavailable` when it
    cannot be built here."""
    params = [p for p in model.parameters() if p.requires_grad]
    if setup.name in ("adamw", "adamw-autocast"):
        try:
            return torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY, fused=True), None
        except (RuntimeError, ValueError) as e:
            raise SetupUnavailable(f"{setup.text}: torch.optim.AdamW(fused=True) failed: {one_line(e)}") from None
    if setup.name == "adamw8bit-bnb":
        bnb = _import(setup, "bitsandbytes.optim")
        return _construct(setup, lambda: bnb.AdamW8bit(params, lr=LR, weight_decay=WEIGHT_DECAY)), None
    if setup.name == "adamw8bit-torchao":
        try:
            cls = _import(setup, "torchao.optim").AdamW8bit
        except (SetupUnavailable, AttributeError):  # torchao < 0.11
            cls = _import(setup, "torchao.prototype.low_bit_optim").AdamW8bit
        return _construct(setup, lambda: cls(params, lr=LR, weight_decay=WEIGHT_DECAY)), None
    if setup.name == "adam-mini-official":
        adam_mini = _import(setup, "adam_mini")
        return _construct(setup, lambda: adam_mini.Adam_mini(
            named_parameters=model.named_parameters(), lr=LR, weight_decay=WEIGHT_DECAY, dim=src.d_model,
            n_heads=src.n_heads, n_kv_heads=src.n_kv_heads, verbose=False)), None
    return _adam_mini(setup, model)


def _adam_mini(setup: Setup, model: nn.Module) -> tuple[Any, Any]:
    from ..optim import AdamMini, step_in_backward

    kw: dict[str, Any] = {}
    if setup.momentum != "fp32":
        kw["momentum_dtype"] = torch.bfloat16 if setup.momentum == "bf16" else "int8"
    if setup.weights != "fp32":
        kw["weights"] = setup.weights
    try:
        opt = AdamMini(model, lr=LR, weight_decay=WEIGHT_DECAY, **kw)
    except TypeError as e:
        if "weights" in kw and "weights" in str(e):
            raise SetupUnavailable(f"{setup.text}: this blockopt's AdamMini does not accept weights= yet "
                                   f"({one_line(e)})") from None
        raise
    except (RuntimeError, ValueError) as e:
        raise SetupUnavailable(f"{setup.text}: AdamMini failed: {one_line(e)}") from None
    handle = step_in_backward(opt) if setup.step_in_backward else None
    return opt, handle


def _import(setup: Setup, module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as e:
        pip = setup.package[1] if setup.package else module
        raise SetupUnavailable(f"{setup.text} needs the package {pip!r} ({module} does not import: "
                               f"{one_line(e)})") from None


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none)."""
    lines = [x.strip() for x in str(e).strip().splitlines() if x.strip()]
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


def _construct(setup: Setup, make: Any) -> Any:
    try:
        return make()
    except Exception as e:  # noqa: BLE001 - a third-party optimizer's own checks, whatever they raise
        raise SetupUnavailable(f"{setup.text} cannot be built here: {first_line(e)}") from None
