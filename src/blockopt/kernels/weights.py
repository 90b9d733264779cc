"""Compact weights: bf16 parameters that keep fp32's updates.

A model whose parameters are bf16 costs 2 bytes per weight instead of 4, and runs
in bf16 as it would under autocast. Rounding every update to bf16 loses the small
ones (an update under half a bf16 ulp, ~0.4 % of the weight, vanishes). The
formats below keep them; the optimizer's step itself runs in fp32 on a widened
copy of one tensor at a time (:func:`widen`), then writes the result back
(:func:`narrow_`):

* ``"bf16-sr"``: the bf16 weight is written with stochastic rounding (16 random
  bits added to the fp32 pattern before its low half is dropped), so the stored
  weight is unbiased: ``E[narrow(w)] = w``. No extra bytes.
* ``"bf16+int8"``: the fp32 pattern is rounded stochastically to 24 bits, then
  split into the nearest bf16 (the model's weight) and a signed 8-bit remainder
  (``weight_remainder``, int8, 1 byte): 16 bits of mantissa, unbiased.
* ``"bf16+int16"``: bf16 plus the 16 low bits as an int16 remainder: the fp32
  weight exactly (``widen(narrow(w)) == w`` bit for bit), 4 bytes in all, with the
  model still reading bf16.

In every format the bf16 weight is the fp32 one rounded to the nearest (ties away
from zero) or stochastically, never truncated. The random bits come from the
counter-based hash of :mod:`blockopt.kernels.momentum` with a seed of the
parameter's name and step, salted so that they are independent of the
momentum's. Work is done in chunks of :data:`CHUNK` elements, so the integer
temporaries stay small next to a large embedding.
"""

from __future__ import annotations

import torch

from .momentum import hash32, step_seed

__all__ = ["CHUNK", "WEIGHT_FORMATS", "narrow_", "new_remainder", "remainder_dtype", "weight_bytes", "widen"]

#: ``AdamMini(weights=...)``: the compact weight formats
WEIGHT_FORMATS = ("bf16-sr", "bf16+int8", "bf16+int16")
#: elements per chunk of the integer work
CHUNK = 1 << 20
#: xored into the parameter's seed: weight rounding draws other bits than its momentum's
_SALT = 0x5BD1E995
_REMAINDER = {"bf16-sr": None, "bf16+int8": torch.int8, "bf16+int16": torch.int16}


def _kernel():
    """The C++ kernel's ops when it is built and has ``narrow_weights`` (else the torch ops below)."""
    from .adam_mini_cpu import load_cpu_kernel

    module = load_cpu_kernel()
    return module if module is not None and hasattr(module, "narrow_weights") else None


def check_format(fmt: object) -> str:
    if fmt not in WEIGHT_FORMATS:
        raise ValueError(f"Invalid weights: {fmt!r}; allowed: None (keep the parameters as they are), "
                         + ", ".join(repr(f) for f in WEIGHT_FORMATS))
    return fmt  # type: ignore[return-value]


def remainder_dtype(fmt: str) -> torch.dtype | None:
    """The dtype of the per-weight remainder of ``fmt`` (``None``: bf16 only)."""
    return _REMAINDER[check_format(fmt)]


def weight_bytes(fmt: str | None) -> int:
    """Bytes per weight held for the model and its optimizer: the bf16 weight plus the remainder."""
    if fmt is None:
        return 4
    dt = remainder_dtype(fmt)
    return 2 + (0 if dt is None else dt.itemsize)


def new_remainder(fmt: str, like: torch.Tensor) -> torch.Tensor | None:
    """A zero remainder for parameter ``like`` (``None`` for ``"bf16-sr"``)."""
    dt = remainder_dtype(fmt)
    return None if dt is None else torch.zeros(like.shape, dtype=dt, device=like.device)


def _flat(t: torch.Tensor) -> torch.Tensor:
    if not t.is_contiguous():
        raise ValueError(f"compact weights need contiguous tensors, got one of shape {tuple(t.shape)} and strides "
                         f"{t.stride()}")
    return t.view(-1)


def widen(p: torch.Tensor, remainder: torch.Tensor | None) -> torch.Tensor:
    """The fp32 weights of bf16 ``p`` and its remainder (a new tensor)."""
    if remainder is None:
        return p.float()
    out = torch.empty(p.shape, dtype=torch.float32, device=p.device)
    shift = 16 if remainder.dtype == torch.int16 else 8
    o, hi_all, lo_all = _flat(out).view(torch.int32), _flat(p).view(torch.int16), _flat(remainder)
    for s in range(0, o.numel(), CHUNK):
        hi = hi_all[s:s + CHUNK].to(torch.int32)
        lo = lo_all[s:s + CHUNK].to(torch.int32)
        if shift == 16:
            o[s:s + CHUNK] = (hi << 16) + lo
        else:
            o[s:s + CHUNK] = ((hi << 8) + lo) << 8
    return out


def narrow_(p: torch.Tensor, remainder: torch.Tensor | None, wide: torch.Tensor, seed: int, step: int,
            offset: int = 0) -> None:
    """Store fp32 ``wide`` into bf16 ``p`` (and its remainder) in place. ``seed``: the parameter's base
    seed (:func:`~blockopt.kernels.momentum.name_seed`); ``step``: the step just taken; ``offset``:
    ``p``'s first element in the full tensor (a shard's), so the random bits do not depend on layout."""
    s_seed = step_seed(seed ^ _SALT, step)
    wide = wide.detach().float().contiguous()
    if wide.device.type == "cpu" and (kernel := _kernel()) is not None:  # the C++ kernel's loop, same bits
        mode = 0 if remainder is None else 1 if remainder.dtype == torch.int8 else 2
        kernel.narrow_weights(_flat(wide), _flat(p), _flat(remainder) if remainder is not None else wide, mode,
                              s_seed, offset)
        return
    bits_all = _flat(wide).view(torch.int32)
    p_all = _flat(p).view(torch.int16)
    r_all = None if remainder is None else _flat(remainder)
    exact = remainder is not None and remainder.dtype == torch.int16
    for s in range(0, bits_all.numel(), CHUNK):
        bits = bits_all[s:s + CHUNK]
        if exact:
            hi = (bits + 0x8000) >> 16  # nearest bf16, ties away from zero (the pattern is sign-magnitude)
            r_all[s:s + CHUNK] = (bits - (hi << 16)).to(torch.int16)  # in [-0x8000, 0x7fff]: exact
        else:
            idx = torch.arange(offset + s, offset + s + bits.numel(), dtype=torch.int64, device=bits.device)
            r = hash32(s_seed, idx)
            if r_all is None:  # stochastic rounding to bf16: E[hi] = value
                hi = ((bits.to(torch.int64) + (r & 0xFFFF)) >> 16).to(torch.int32)
            else:  # stochastic rounding to 24 bits, then the nearest bf16 and an 8-bit remainder
                q = ((bits.to(torch.int64) + (r & 0xFF)) >> 8).to(torch.int32)
                hi = (q + 0x80) >> 8
                r_all[s:s + CHUNK] = (q - (hi << 8)).to(torch.int8)  # in [-0x80, 0x7f]
        p_all[s:s + CHUNK] = hi.to(torch.int16)
