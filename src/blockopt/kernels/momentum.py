"""Storage formats for the first moment ``m``: fp32, bf16 with stochastic rounding, 8-bit codes.

The math of a step always runs on fp32 values; these functions only move ``m``
between its stored form and fp32 (the storage format is kept separate from the
update, as torchao's low-bit optimizers do). The fused CPU kernel implements the
same formats inline (``adam_mini_cpu.cpp``) with the same hash and formulas.

* ``"bf16"``: ``m`` is a bfloat16 tensor. Encoding rounds stochastically: the 16
  low bits of the fp32 pattern are dropped after adding 16 random bits, so the
  stored value is unbiased (``E[decode(encode(x))] = x``) and small EMA
  increments are not lost to round-to-nearest. 2 bytes per element.
* ``"int8"``: ``m`` is an int8 tensor of the parameter's shape plus one fp32
  scale per group of :data:`GROUP` consecutive elements of a row
  (``exp_avg_scale``, shape ``[rows, ceil(row_numel / GROUP)]``; rows are dim 0,
  so a group never crosses an FSDP2 ``Shard(0)`` boundary). A value ``x`` in a
  group with absolute maximum ``a`` is stored as ``q = sign(x) * floor(127 *
  sqrt(|x| / a) + u)`` (``u`` uniform in [0, 1): stochastic rounding) and read as
  ``sign(q) * q**2 * a / 127**2``. The square-root map keeps relative precision
  for entries far below the group's maximum (dynamic range 127**2), as
  block-wise dynamic quantisation does. About 1.016 bytes per element.
  One-dimensional tensors (biases, norms; a negligible share of the state)
  keep bf16 momentum under ``"int8"``.

Random bits come from a counter-based hash of ``(seed, element index)``: no
generator state, the same bits on every path and for every sharding (the index
is the element's position in the full tensor), and a resumed run draws what an
uninterrupted one would. The seed mixes the parameter's name and the step.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence

import torch

__all__ = [
    "CODECS",
    "GROUP",
    "MOMENTUM_FORMATS",
    "Codec",
    "codec_for",
    "decode",
    "encode_",
    "format_for",
    "hash32",
    "momentum_bytes",
    "momentum_format",
    "name_seed",
    "new_state",
    "scale_shape",
    "step_seed",
    "stored_format",
]

#: elements per int8 scale group, along a row
GROUP = 256
#: user-facing names (``AdamMini(momentum_dtype=...)``) -> format
MOMENTUM_FORMATS = {None: "fp32", torch.float32: "fp32", torch.bfloat16: "bf16", "bf16": "bf16",
                    "bfloat16": "bf16", "int8": "int8", torch.int8: "int8"}

_M32 = 0xFFFFFFFF


def momentum_format(momentum_dtype: object) -> str:
    """The format for ``AdamMini(momentum_dtype=...)``; raises ``ValueError`` naming what is allowed."""
    try:
        return MOMENTUM_FORMATS[momentum_dtype]  # type: ignore[index]
    except (KeyError, TypeError):
        raise ValueError(
            f"Invalid momentum_dtype: {momentum_dtype!r}; expected None (fp32), torch.bfloat16 or 'int8'"
        ) from None


def stored_format(m: torch.Tensor) -> str:
    """The format a stored first moment is in, read from its dtype (int8, bf16; anything else fp32)."""
    return {torch.int8: "int8", torch.bfloat16: "bf16"}.get(m.dtype, "fp32")


def format_for(fmt: str, shape: tuple[int, ...]) -> str:
    """The format actually used for a tensor of ``shape`` (int8 needs rows: 1-D tensors keep bf16)."""
    return "bf16" if fmt == "int8" and len(shape) < 2 else fmt


def scale_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    rows = shape[0]
    cols = math.prod(shape[1:])
    return rows, -(-cols // GROUP)


def momentum_bytes(fmt: str, shape: tuple[int, ...]) -> int:
    """Bytes of the stored first moment of a tensor of ``shape`` (fp32 state: 4 per element)."""
    fmt = format_for(fmt, shape)
    n = math.prod(shape)
    if fmt == "fp32":
        return 4 * n
    if fmt == "bf16":
        return 2 * n
    return n + 4 * math.prod(scale_shape(shape))


def name_seed(name: str) -> int:
    return zlib.crc32(name.encode())


def step_seed(base: int, step: int) -> int:
    """A 32-bit seed for one parameter and one step."""
    return hash32_int((base ^ (step * 0x9E3779B1)) & _M32)


def hash32_int(x: int) -> int:
    x &= _M32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & _M32
    x ^= x >> 16
    return x


def hash32(seed: int, index: torch.Tensor) -> torch.Tensor:
    """The 32-bit hash of ``seed + index * 0x9E3779B9`` for every element of int64 ``index``."""
    x = (index * 0x9E3779B9 + seed) & _M32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def _indices(n: int, offset: int, device: torch.device) -> torch.Tensor:
    return torch.arange(offset, offset + n, dtype=torch.int64, device=device)


def new_state(fmt: str, like: torch.Tensor) -> dict[str, torch.Tensor]:
    """Zero momentum state for parameter tensor ``like`` (a plain tensor: the local shard under FSDP2)."""
    fmt = format_for(fmt, tuple(like.shape))
    if fmt == "int8":
        return {"exp_avg": torch.zeros(like.shape, dtype=torch.int8, device=like.device),
                "exp_avg_scale": torch.zeros(scale_shape(tuple(like.shape)), dtype=torch.float32, device=like.device)}
    dtype = torch.bfloat16 if fmt == "bf16" else torch.float32
    return {"exp_avg": torch.zeros(like.shape, dtype=dtype, device=like.device)}


def decode(m: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 values of a stored first moment (a new tensor; for fp32 storage, ``m`` itself)."""
    if m.dtype == torch.float32:
        return m
    if m.dtype == torch.bfloat16:
        return m.float()
    if scale is None:
        raise ValueError("int8 momentum needs its exp_avg_scale")
    rows, groups = scale.shape
    q = m.reshape(rows, -1).float()
    cols = q.shape[1]
    pad = groups * GROUP - cols
    if pad:
        q = torch.nn.functional.pad(q, (0, pad))
    q = q.view(rows, groups, GROUP)
    out = (q * q.abs()) * (scale / 16129.0).unsqueeze(-1)
    return out.view(rows, -1)[:, :cols].reshape(m.shape)


def encode_(m: torch.Tensor, value: torch.Tensor, seed: int, scale: torch.Tensor | None = None,
            offset: int | torch.Tensor = 0) -> None:
    """Store fp32 ``value`` into ``m`` (and ``scale``) with stochastic rounding.

    ``offset`` is the index of ``value``'s first element in the full tensor (a
    shard's offset under FSDP2), or an int64 tensor of every element's index (a
    tensor-parallel box), so the random bits do not depend on sharding.
    """
    if m.dtype == torch.float32:
        if value is not m:
            m.copy_(value)
        return
    v = value.detach().contiguous()
    idx = offset.view(v.shape) if isinstance(offset, torch.Tensor) else _indices(v.numel(), offset, v.device).view(v.shape)
    r = hash32(seed, idx)
    if m.dtype == torch.bfloat16:
        bits = v.view(torch.int32).to(torch.int64) & _M32
        bits = (bits + (r & 0xFFFF)) & 0xFFFF0000
        # back to a signed 32-bit pattern; the low 16 bits are zero, so the bf16 cast is exact
        bits = torch.where(bits >= 2**31, bits - 2**32, bits).to(torch.int32)
        m.copy_(bits.view(torch.float32).to(torch.bfloat16))
        return
    if scale is None:
        raise ValueError("int8 momentum needs its exp_avg_scale")
    rows, groups = scale.shape
    x = v.reshape(rows, -1)
    cols = x.shape[1]
    u = ((r >> 8).to(torch.float32) * (1.0 / 16777216.0)).reshape(rows, -1)
    pad = groups * GROUP - cols
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
        u = torch.nn.functional.pad(u, (0, pad))
    x = x.view(rows, groups, GROUP)
    u = u.view(rows, groups, GROUP)
    amax = x.abs().amax(dim=-1)
    inv = torch.where(amax > 0, 1.0 / amax, torch.zeros_like(amax)).unsqueeze(-1)
    y = torch.sqrt(x.abs() * inv) * 127.0
    q = torch.clamp(torch.floor(y + u), max=127.0) * torch.sign(x)
    scale.copy_(amax)
    m.copy_(q.view(rows, -1)[:, :cols].reshape(m.shape).to(torch.int8))


class Codec:
    """A compact storage format around a route that computes on fp32 ``exp_avg`` tensors.

    :meth:`decode` returns the fp32 values of stored first moments (new tensors); after the
    step, :meth:`encode` stores the updated values back with the seed of the step just taken,
    as the fused kernels do inline. One instance per compact format (:data:`CODECS`);
    ``"int8"``'s also carries the bf16 momentum of its 1-D tensors (:func:`format_for`).
    """

    def __init__(self, fmt: str) -> None:
        self.format = fmt

    def __repr__(self) -> str:
        return f"Codec({self.format!r})"

    def decode(self, exp_avgs: Sequence[torch.Tensor], scales: Sequence[torch.Tensor | None] = ()) -> list[torch.Tensor]:
        return [decode(m, scales[i] if scales else None) for i, m in enumerate(exp_avgs)]

    def encode(self, exp_avgs: Sequence[torch.Tensor], values: Sequence[torch.Tensor], steps: Sequence[torch.Tensor],
               scales: Sequence[torch.Tensor | None] = (), seeds: Sequence[int] = (),
               offsets: Sequence[int | torch.Tensor] = ()) -> None:
        """``steps``: the step counters (already incremented); ``seeds``: each tensor's base seed
        (:func:`name_seed`, default 0); ``offsets``: each tensor's first element in the full tensor
        (a shard's, under FSDP2; default 0)."""
        for i, (m, v) in enumerate(zip(exp_avgs, values, strict=True)):
            seed = step_seed(seeds[i] if seeds else 0, int(steps[i].item()))
            encode_(m, v.float(), seed, scales[i] if scales else None, offsets[i] if offsets else 0)


#: the codec of each compact format
CODECS = {"bf16": Codec("bf16"), "int8": Codec("int8")}


def codec_for(fmt: str) -> Codec | None:
    """The codec of storage format ``fmt`` (``None`` for fp32: there is nothing to decode)."""
    return CODECS.get(fmt)
