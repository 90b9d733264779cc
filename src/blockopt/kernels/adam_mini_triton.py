"""The GPU step: Triton kernels that fuse the block reduction with the update.

Same contract as the other step functions in :mod:`blockopt.kernels`. One
program handles one block: it sums ``g * g`` over the block, updates the
block's second moment, then sweeps the block again (now in cache) to update
``m`` and ``p``. Per-element blocks (biases) use an element-wise Adam kernel.
Parameters may be fp32, bf16 or fp16; arithmetic is fp32. The first moment is
stored in fp32, in bf16 with stochastic rounding, or as int8 codes with one
scale per group of 256 elements of a row (:mod:`blockopt.kernels.momentum`;
for int8 one program decodes, updates and re-encodes whole groups).

With ``capturable=True`` nothing leaves the device: the step counters are
device tensors incremented in place, bias corrections are computed inside the
kernel from them, and a tensor ``lr`` is read from device memory, so the step
can be recorded in a CUDA graph.

Correctness tests run on CPU tensors with ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import contextlib
import math
from collections import OrderedDict
from collections.abc import Sequence

import torch

from .blocks import Geometry
from .momentum import GROUP, step_seed

__all__ = ["adam_mini_triton", "triton_available", "triton_supports"]

try:  # Triton is optional (the [gpu] extra)
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the environment
    triton = None
    tl = None


def triton_available() -> bool:
    return triton is not None


def triton_supports(p: torch.Tensor, exp_avg: torch.Tensor, geometry: Geometry) -> bool:
    """Contiguous tensors whose blocks are runs of consecutive elements (rows, heads, tensors, elements)."""
    return (
        triton is not None
        and p.dtype in (torch.float32, torch.bfloat16, torch.float16)
        and exp_avg.dtype in (torch.float32, torch.bfloat16, torch.int8)  # momentum_dtype=bf16 / "int8"
        and p.is_contiguous()
        and exp_avg.is_contiguous()
        and geometry.axis in (-1, 0)
        and (exp_avg.dtype != torch.int8 or _whole_rows(tuple(p.shape), geometry))
        and type(p) in (torch.nn.Parameter, torch.Tensor)
    )


def _whole_rows(shape: tuple[int, ...], geometry: Geometry) -> bool:
    """int8 codes are grouped along rows: every block must be made of whole rows of a 2-D+ tensor."""
    axis, segments = geometry
    return len(shape) >= 2 and (axis == 0 or (len(segments) == 1 and segments[0][0] == segments[0][1]))


def _check_int8(shape: tuple[int, ...], scale: torch.Tensor | None, geometry: Geometry) -> None:
    if scale is None or scale.dtype != torch.float32 or scale.dim() != 2 or not scale.is_contiguous():
        raise ValueError("int8 momentum needs its exp_avg_scale: contiguous float32 [rows, groups]")
    if not _whole_rows(shape, geometry):
        raise ValueError(f"int8 momentum needs blocks of whole rows; got geometry {geometry} for shape {shape}")
    want = (shape[0], -(-math.prod(shape[1:]) // GROUP))
    if tuple(scale.shape) != want:
        raise ValueError(f"int8 momentum: exp_avg_scale has shape {tuple(scale.shape)}; expected {want} "
                         f"for a parameter of shape {shape}")


if triton is not None:

    @triton.jit
    def _one_minus_pow(ln_beta, t):
        """1 - beta**t = -expm1(t * ln(beta)), accurate in fp32 where beta**t is close to 1."""
        x = t * ln_beta
        series = x * (1.0 + x * (0.5 + x * (1.0 / 6 + x * (1.0 / 24 + x * (1.0 / 120 + x * (1.0 / 720))))))
        return tl.where(tl.abs(x) < 0.1, -series, 1.0 - tl.exp(x))

    @triton.jit
    def _store_param(ptr, x, mask):
        """Store fp32 ``x`` in the parameter's dtype, rounding to nearest even for bf16 (by bit arithmetic:
        the same result on GPUs and in the Triton interpreter, which would otherwise truncate)."""
        if ptr.dtype.element_ty == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = bits + (((bits >> 16) & 1) + 0x7FFF)
            tl.store(ptr, (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)
        else:
            tl.store(ptr, x.to(ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _hash32(index, seed):
        """:func:`blockopt.kernels.momentum.hash32` of int64 ``index`` (32 bits, in an int64)."""
        M: tl.constexpr = 0xFFFFFFFF
        x = (index * 0x9E3779B9 + seed) & M
        x = x ^ (x >> 16)
        x = (x * 0x7FEB352D) & M
        x = x ^ (x >> 15)
        x = (x * 0x846CA68B) & M
        return x ^ (x >> 16)

    @triton.jit
    def _store_momentum(ptr, m, index, seed, mask):
        """fp32 ``m`` into the state; a bf16 state rounds stochastically with the bits of
        :func:`blockopt.kernels.momentum.hash32` at each element's index (the same bits as the CPU paths)."""
        if ptr.dtype.element_ty == tl.bfloat16:
            x = _hash32(index, seed)
            bits = m.to(tl.uint32, bitcast=True).to(tl.int64)
            bits = ((bits + (x & 0xFFFF)) & 0xFFFFFFFF) >> 16
            tl.store(ptr, bits.to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)
        else:
            tl.store(ptr, m, mask=mask)

    @triton.jit
    def _block_denom(g_ptr, v_ptr, b, base, block_size, bc2_sqrt, beta2, omb2, eps, TILE: tl.constexpr):
        """The first sweep of block ``b``: mean of g*g, the block's new v (stored), and the
        denominator sqrt(v / (1 - beta2**t)) + eps of its update."""
        acc = tl.zeros([TILE], dtype=tl.float32)
        for start in range(0, block_size, TILE):
            offs = start + tl.arange(0, TILE)
            mask = offs < block_size
            g = tl.load(g_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
            acc += g * g
        mean = tl.sum(acc, axis=0) / block_size
        v = tl.load(v_ptr + b) * beta2 + omb2 * mean
        tl.store(v_ptr + b, v)
        return tl.sqrt(v) / bc2_sqrt + eps

    @triton.jit
    def _block_body(p_ptr, g_ptr, m_ptr, v_ptr, b, block_size, step_size, bc2_sqrt, dmul, beta2, omb1, omb2, eps,
                    seed, first, MAXIMIZE: tl.constexpr, TILE: tl.constexpr):
        """Block ``b`` of a segment: sum g*g, update its v, then sweep again to update m and p.
        ``dmul``: the decoupled weight-decay factor (1 for no decay; ``p * 1.0`` is exact)."""
        base = b.to(tl.int64) * block_size
        denom = _block_denom(g_ptr, v_ptr, b, base, block_size, bc2_sqrt, beta2, omb2, eps, TILE)
        for start in range(0, block_size, TILE):
            offs = start + tl.arange(0, TILE)
            mask = offs < block_size
            g = tl.load(g_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
            if MAXIMIZE:
                g = -g
            m = tl.load(m_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
            m = m + omb1 * (g - m)
            _store_momentum(m_ptr + base + offs, m, first + base + offs, seed, mask)
            p = tl.load(p_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
            p = p * dmul
            p = p - step_size * (m / denom)
            _store_param(p_ptr + base + offs, p, mask)

    @triton.jit
    def _element_body(p_ptr, g_ptr, m_ptr, v_ptr, offs, n, step_size, bc2_sqrt, dmul, beta2, omb1, omb2, eps,
                      seed, first, MAXIMIZE: tl.constexpr):
        """Elements ``offs`` of a segment of per-element blocks: Adam."""
        mask = offs < n
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if MAXIMIZE:
            g = -g
        m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        m = m + omb1 * (g - m)
        v = tl.load(v_ptr + offs, mask=mask, other=0.0)
        v = v * beta2 + omb2 * g * g
        _store_momentum(m_ptr + offs, m, first + offs, seed, mask)
        tl.store(v_ptr + offs, v, mask=mask)
        p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        p = p * dmul
        p = p - step_size * (m / (tl.sqrt(v) / bc2_sqrt + eps))
        _store_param(p_ptr + offs, p, mask)

    @triton.jit
    def _device_scalars(step_ptr, lr_ptr, ln_beta1, ln_beta2):
        """lr, step size and sqrt(1 - beta2**t) from device memory (capturable steps)."""
        t = tl.load(step_ptr)
        lr = tl.load(lr_ptr)
        return lr, lr / _one_minus_pow(ln_beta1, t), tl.sqrt(_one_minus_pow(ln_beta2, t))

    @triton.jit
    def _block_kernel(
        p_ptr, g_ptr, m_ptr, v_ptr, step_ptr, lr_ptr,
        lr, step_size, bc2_sqrt, ln_beta1, ln_beta2, beta2, omb1, omb2, eps, weight_decay, seed, first,
        block_size,
        DECAY: tl.constexpr, MAXIMIZE: tl.constexpr, CAPTURABLE: tl.constexpr, TILE: tl.constexpr,
    ):
        if CAPTURABLE:
            lr, step_size, bc2_sqrt = _device_scalars(step_ptr, lr_ptr, ln_beta1, ln_beta2)
        dmul = 1.0 - lr * weight_decay if DECAY else 1.0
        _block_body(p_ptr, g_ptr, m_ptr, v_ptr, tl.program_id(0), block_size, step_size, bc2_sqrt, dmul, beta2,
                    omb1, omb2, eps, seed, first, MAXIMIZE, TILE)

    @triton.jit
    def _element_kernel(
        p_ptr, g_ptr, m_ptr, v_ptr, step_ptr, lr_ptr,
        lr, step_size, bc2_sqrt, ln_beta1, ln_beta2, beta2, omb1, omb2, eps, weight_decay, seed, first,
        n,
        DECAY: tl.constexpr, MAXIMIZE: tl.constexpr, CAPTURABLE: tl.constexpr, TILE: tl.constexpr,
    ):
        if CAPTURABLE:
            lr, step_size, bc2_sqrt = _device_scalars(step_ptr, lr_ptr, ln_beta1, ln_beta2)
        dmul = 1.0 - lr * weight_decay if DECAY else 1.0
        offs = tl.program_id(0).to(tl.int64) * TILE + tl.arange(0, TILE)
        _element_body(p_ptr, g_ptr, m_ptr, v_ptr, offs, n, step_size, bc2_sqrt, dmul, beta2, omb1, omb2, eps,
                      seed, first, MAXIMIZE)

    @triton.jit
    def _find_segment(starts_ptr, pid, LOG: tl.constexpr):
        """The segment whose first program is the last of ``starts`` (sorted, starts[0] = 0) <= pid."""
        lo = pid * 0
        hi = lo + (1 << LOG)
        for _ in tl.static_range(LOG):
            mid = (lo + hi) // 2
            ok = tl.load(starts_ptr + mid) <= pid
            lo = tl.where(ok, mid, lo)
            hi = tl.where(ok, hi, mid)
        return lo

    @triton.jit
    def _multi_kernel(
        itab, dtab, ftab, starts, p_like, g_like, m_like,
        lr, beta2, omb1, omb2, eps, weight_decay,
        ELEMENTS: tl.constexpr, MAXIMIZE: tl.constexpr, TILE: tl.constexpr, LOG: tl.constexpr,
        ALIGNED: tl.constexpr,
    ):
        """Many segments in one launch. Row ``s`` of ``itab`` (int64, fixed while the tensors are):
        addresses of p, m and v at the segment's start, its block size (per-element blocks: its
        length), the index of its first element in the tensor, whether it decays; of ``dtab``
        (int64, per step): the gradient's address there and the random seed; of ``ftab`` (fp32, per
        step): step size and sqrt(1 - beta2**t). ``starts[s]``: the segment's first program (padded
        with a large value to a power of two). ``*_like``: tensors whose pointer types the addresses
        take. ``ALIGNED``: the host checked the alignment the hints below state."""
        pid = tl.program_id(0).to(tl.int64)
        seg = _find_segment(starts, pid, LOG)
        row = itab + seg * 6
        p_ptr = tl.load(row).to(p_like.dtype)
        m_ptr = tl.load(row + 1).to(m_like.dtype)
        v_ptr = tl.load(row + 2).to(tl.pointer_type(tl.float32))
        size = tl.load(row + 3)
        first = tl.load(row + 4)
        dmul = tl.where(tl.load(row + 5) != 0, 1.0 - lr * weight_decay, 1.0)
        g_ptr = tl.load(dtab + seg * 2).to(g_like.dtype)
        seed = tl.load(dtab + seg * 2 + 1)
        step_size = tl.load(ftab + seg * 2)
        bc2_sqrt = tl.load(ftab + seg * 2 + 1)
        local = pid - tl.load(starts + seg)
        if ALIGNED:  # every address of this launch is 16-byte aligned and every size a multiple of 4
            p_ptr = tl.multiple_of(p_ptr, 16)
            g_ptr = tl.multiple_of(g_ptr, 16)
            m_ptr = tl.multiple_of(m_ptr, 16)
            size = tl.multiple_of(size, 4)
        if ELEMENTS:
            offs = local * TILE + tl.arange(0, TILE)
            _element_body(p_ptr, g_ptr, m_ptr, v_ptr, offs, size, step_size, bc2_sqrt, dmul, beta2, omb1, omb2,
                          eps, seed, first, MAXIMIZE)
        else:
            _block_body(p_ptr, g_ptr, m_ptr, v_ptr, local, size, step_size, bc2_sqrt, dmul, beta2, omb1, omb2,
                        eps, seed, first, MAXIMIZE, TILE)

    @triton.jit
    def _block_kernel_int8(
        p_ptr, g_ptr, q_ptr, scale_ptr, v_ptr,
        lr, step_size, bc2_sqrt, beta2, omb1, omb2, eps, weight_decay, seed,
        block_size, row0, rows_per_block, cols, groups,
        DECAY: tl.constexpr, MAXIMIZE: tl.constexpr, TILE: tl.constexpr, GPT: tl.constexpr, GROUP: tl.constexpr,
    ):
        """One block of whole rows with int8 momentum. ``p_ptr``/``g_ptr``/``v_ptr`` start at the
        segment, ``q_ptr``/``scale_ptr`` at the tensor (row ``row0`` is the segment's first row).
        The second sweep takes ``GPT`` scale groups of a row at a time, as a [GPT, GROUP] tile:
        decode, update ``m`` and ``p``, then re-encode each group with its new absolute maximum."""
        b = tl.program_id(0)
        base = b.to(tl.int64) * block_size
        denom = _block_denom(g_ptr, v_ptr, b, base, block_size, bc2_sqrt, beta2, omb2, eps, TILE)
        gi = tl.arange(0, GPT)
        ci = tl.arange(0, GROUP)
        for r in range(rows_per_block):
            row = row0 + b.to(tl.int64) * rows_per_block + r
            local = base + r * cols  # the row's first element, from the segment's start
            for g0 in range(0, groups, GPT):
                gidx = g0 + gi
                col = gidx[:, None] * GROUP + ci[None, :]
                mask = col < cols
                gmask = gidx < groups
                a_old = tl.load(scale_ptr + row * groups + gidx, mask=gmask, other=0.0)
                q = tl.load(q_ptr + row * cols + col, mask=mask, other=0).to(tl.float32)
                m = (q * tl.abs(q)) * (a_old / 16129.0)[:, None]
                g = tl.load(g_ptr + local + col, mask=mask, other=0.0).to(tl.float32)
                if MAXIMIZE:
                    g = -g
                m = m + omb1 * (g - m)
                m = tl.where(mask, m, 0.0)
                p = tl.load(p_ptr + local + col, mask=mask, other=0.0).to(tl.float32)
                if DECAY:
                    p = p * (1.0 - lr * weight_decay)
                p = p - step_size * (m / denom)
                _store_param(p_ptr + local + col, p, mask)
                amax = tl.max(tl.abs(m), axis=1)
                safe = tl.where(amax > 0, amax, 1.0)
                inv = tl.where(amax > 0, tl.div_rn(tl.full([GPT], 1.0, tl.float32), safe), 0.0)
                u = (_hash32(row * cols + col, seed) >> 8).to(tl.float32) * (1.0 / 16777216.0)
                y = tl.sqrt_rn(tl.abs(m) * inv[:, None]) * 127.0
                code = tl.minimum(tl.floor(y + u), 127.0)
                code = tl.where(m < 0, -code, code)
                tl.store(q_ptr + row * cols + col, code.to(tl.int8), mask=mask)
                tl.store(scale_ptr + row * groups + gidx, amax, mask=gmask)


def _fix_interpreter_index() -> None:
    """Triton < 3.7's interpreter gives its tensors ``__index__ = int(handle.data)``; a scalar there is a
    numpy array of shape (1,), which NumPy >= 2.4 no longer converts (``TypeError: only 0-dimensional
    arrays can be converted to Python scalars``), so ``range(0, block_size, TILE)`` over a runtime
    ``block_size`` fails. Install Triton 3.7's ``int(handle.data.squeeze())`` after the interpreter's
    own patch (through its restore scope where it has one). Interpreter only: compiled kernels are untouched."""
    from triton.runtime import interpreter

    patch = getattr(interpreter, "_patch_lang_tensor", None)
    if patch is None or getattr(patch, "_blockopt_index", False):
        return
    try:
        if tuple(int(x) for x in triton.__version__.split(".")[:2]) >= (3, 7):
            return
    except ValueError:  # an unparsable version: patching is harmless, the value is the same
        pass

    def index(self):
        return int(self.handle.data.squeeze())

    def patched(tensor, *scope):
        patch(tensor, *scope)
        if scope:  # 3.6: patches are undone after each launch, in reverse order
            scope[0].set_attr(tensor, "__index__", index)
        else:
            tensor.__index__ = index

    patched._blockopt_index = True
    interpreter._patch_lang_tensor = patched


if triton is not None and type(_block_kernel).__module__ == "triton.runtime.interpreter":  # TRITON_INTERPRET=1
    _fix_interpreter_index()


def _on(device: torch.device):
    """Launch on ``device``'s GPU (Triton launches on the current device)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _runs(shape: tuple[int, ...], geometry: Geometry) -> list[tuple[int, int, int, int]]:
    """(element offset, blocks, block size, v offset) for each segment."""
    numel = math.prod(shape)
    axis, segments = geometry
    inner = 1 if axis == -1 else numel // shape[0]
    out, off, voff = [], 0, 0
    for size, unit in segments:
        nb, bs = size // unit, unit * inner
        out.append((off, nb, bs, voff))
        off += nb * bs
        voff += nb
    return out


def adam_mini_triton(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    block_exp_avg_sqs: Sequence[torch.Tensor],
    state_steps: Sequence[torch.Tensor],
    geometries: Sequence[Geometry],
    decay: Sequence[bool],
    *,
    lr: float | torch.Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    maximize: bool,
    capturable: bool = False,
    seeds: Sequence[int] | None = None,
    scales: Sequence[torch.Tensor | None] | None = None,
    multi_tensor: bool = True,
) -> None:
    """Fused Triton step; with ``capturable`` the steps and ``lr`` live on the device.

    Without ``capturable``, ``multi_tensor`` (the default) steps the fp32/bf16-momentum tensors in
    a few launches (one per kind of segment, parameter dtype and tile), each reading a table of the
    segments' addresses, instead of a launch per segment; the results are the same bit for bit.

    ``exp_avgs`` may be bf16 (``momentum_dtype=torch.bfloat16``): stored with stochastic rounding,
    with ``seeds`` the parameters' base seeds (:func:`blockopt.kernels.momentum.name_seed`). They
    may be int8 codes (``momentum_dtype="int8"``, blocks of whole rows): then ``scales[i]`` is the
    parameter's fp32 ``exp_avg_scale`` of shape ``[rows, groups]``, updated in place.
    """
    if triton is None:
        raise RuntimeError("Triton is not installed: pip install 'blockopt[gpu]'")
    if not params:
        return
    scales = list(scales) if scales is not None else [None] * len(params)
    for p, m, scale, geometry, step_t in zip(params, exp_avgs, scales, geometries, state_steps):  # before any change
        if m.dtype == torch.int8:
            _check_int8(tuple(p.shape), scale, geometry)
        if capturable and m.dtype != torch.float32:
            raise ValueError("capturable=True keeps fp32 momentum")
        if capturable and step_t.device != p.device:
            raise ValueError("capturable=True needs the step tensors on the parameter's device")
    torch._foreach_add_(list(state_steps), 1.0)
    if capturable:
        device = params[0].device
        lr_t = lr if isinstance(lr, torch.Tensor) else torch.tensor(float(lr), device=device)
        lr_t = lr_t.to(device=device, dtype=torch.float32).reshape(1)
    seeds = list(seeds) if seeds is not None else [0] * len(params)
    grads = [g if g.is_contiguous() else g.contiguous() for g in grads]
    if multi_tensor and not capturable:
        multi = [i for i, m in enumerate(exp_avgs) if m.dtype != torch.int8]
        lr_f = lr.item() if isinstance(lr, torch.Tensor) else float(lr)
        by_device: dict[torch.device, list[int]] = {}
        for i in multi:  # a table holds addresses on one device
            by_device.setdefault(params[i].device, []).append(i)
        hyper = {"lr": lr_f, "beta1": beta1, "beta2": beta2, "eps": eps, "weight_decay": weight_decay, "maximize": maximize}
        if len(multi) == len(params) and len(by_device) == 1:  # the usual case: one table, all of it
            _multi_launches(params, grads, exp_avgs, block_exp_avg_sqs, state_steps, geometries, decay, seeds,
                            **hyper)
            return
        for idx in by_device.values():
            _multi_launches([params[i] for i in idx], [grads[i] for i in idx], [exp_avgs[i] for i in idx],
                            [block_exp_avg_sqs[i] for i in idx], [state_steps[i] for i in idx],
                            [geometries[i] for i in idx], [decay[i] for i in idx], [seeds[i] for i in idx],
                            **hyper)
        keep = set(multi)
        params, grads, exp_avgs, block_exp_avg_sqs, state_steps, geometries, decay, seeds, scales = (
            [x for i, x in enumerate(lst) if i not in keep]
            for lst in (params, grads, exp_avgs, block_exp_avg_sqs, state_steps, geometries, decay, seeds, scales))
    for p, g, m, v, step_t, geometry, on, base_seed, scale in zip(
        params, grads, exp_avgs, block_exp_avg_sqs, state_steps, geometries, decay, seeds, scales
    ):
        if capturable:
            step_size, bc2_sqrt, lr_f, step_ptr, lr_ptr = 0.0, 1.0, 0.0, step_t, lr_t
        else:
            t = step_t.item()
            lr_f = lr.item() if isinstance(lr, torch.Tensor) else lr
            step_size, bc2_sqrt = lr_f / (1 - beta1**t), (1 - beta2**t) ** 0.5
            step_ptr = lr_ptr = v  # unused when not capturable
        seed = step_seed(base_seed, int(t)) if m.dtype in (torch.bfloat16, torch.int8) else 0
        flags = {"DECAY": bool(on and weight_decay != 0), "MAXIMIZE": bool(maximize), "CAPTURABLE": bool(capturable)}
        # 1 - beta from the host in double: in fp32, 1 - 0.999 cancels to 1.3e-5 off
        scalars = (lr_f, step_size, bc2_sqrt, math.log(beta1) if beta1 > 0 else -math.inf,
                   math.log(beta2) if beta2 > 0 else -math.inf, beta2, 1.0 - beta1, 1.0 - beta2, eps, weight_decay,
                   seed)
        pf, gf, mf = p.view(-1), g.view(-1), m.view(-1)
        with _on(p.device):
            _segment_launches(pf, gf, mf, v, scale, p.shape, geometry, scalars, flags, step_ptr, lr_ptr)


def _segment_launches(pf, gf, mf, v, scale, shape, geometry, scalars, flags, step_ptr, lr_ptr) -> None:
    """A launch per segment of one parameter (int8 momentum, capturable steps, ``multi_tensor=False``)."""
    if mf.dtype == torch.int8:
        _int8_launches(pf, gf, mf, v, scale, shape, geometry, scalars, flags)
        return
    for off, nb, bs, voff in _runs(tuple(shape), geometry):
        n = nb * bs
        args = (pf[off:off + n], gf[off:off + n], mf[off:off + n], v[voff:voff + nb], step_ptr, lr_ptr, *scalars,
                off)
        if bs == 1:
            tile = 1024
            _element_kernel[(triton.cdiv(n, tile),)](*args, n, TILE=tile, **flags)
        else:
            tile = min(1024, triton.next_power_of_2(bs))
            _block_kernel[(nb,)](*args, bs, TILE=tile, **flags)


def _int8_launches(pf: torch.Tensor, gf: torch.Tensor, qf: torch.Tensor, v: torch.Tensor, scale: torch.Tensor | None,
                   shape: torch.Size, geometry: Geometry, scalars: tuple, flags: dict) -> None:
    """The int8-momentum step of one parameter (checked by _check_int8): one launch per segment,
    a program per block."""
    cols = math.prod(shape[1:])
    groups = scale.shape[1]
    lr_f, step_size, bc2_sqrt, _, _, beta2, omb1, omb2, eps, weight_decay, seed = scalars
    gpt = max(1, min(4, triton.next_power_of_2(groups)))  # up to 1024 elements of a row per tile
    for off, nb, bs, voff in _runs(tuple(shape), geometry):
        n = nb * bs
        _block_kernel_int8[(nb,)](
            pf[off:off + n], gf[off:off + n], qf, scale, v[voff:voff + nb],
            lr_f, step_size, bc2_sqrt, beta2, omb1, omb2, eps, weight_decay, seed,
            bs, off // cols, bs // cols, cols, groups,
            DECAY=flags["DECAY"], MAXIMIZE=flags["MAXIMIZE"], TILE=min(1024, triton.next_power_of_2(bs)),
            GPT=gpt, GROUP=GROUP,
        )


class _MultiPlan:
    """What stays fixed while the tensors do: per launch, its segments' static table and program starts
    on the device; per segment, its tensor and the gradient's byte offset (to add each step)."""

    def __init__(self, params, grads, exp_avgs, vs, geometries, decay, seeds) -> None:
        launches: dict[tuple, list[tuple]] = {}
        for i, (p, g, m, v, geometry, on) in enumerate(zip(params, grads, exp_avgs, vs, geometries, decay)):
            for off, nb, bs, voff in _runs(tuple(p.shape), geometry):
                if nb == 0:
                    continue
                elements = bs == 1
                tile = 1024 if elements else min(1024, 1 << (bs - 1).bit_length())
                size, programs = (nb, -(-nb // tile)) if elements else (bs, nb)
                row = (p.data_ptr() + off * p.element_size(), m.data_ptr() + off * m.element_size(),
                       v.data_ptr() + voff * 4, size, off, int(on))
                launches.setdefault((elements, tile, p.dtype, g.dtype, m.dtype), []).append(
                    (row, i, off * g.element_size(), programs))
        device = params[0].device
        rows, starts, self.seg_tensor, self.g_off, self.launches = [], [], [], [], []
        for (elements, tile, *_), segs in launches.items():
            log = max(1, (len(segs) - 1).bit_length())
            first = 0
            for row, i, g_off, programs in segs:
                rows.append(row)
                starts.append(first)
                self.seg_tensor.append(i)
                self.g_off.append(g_off)
                first += programs
            starts.extend([1 << 62] * ((1 << log) - len(segs)))  # padding the search never passes
            # 16-byte aligned starts and sizes that are multiples of 4: the kernel may then use
            # vector loads (the addresses come from a table, so Triton cannot see their alignment)
            aligned = all(row[0] % 16 == 0 and row[1] % 16 == 0 and row[3] % 4 == 0 for row, *_ in segs)
            self.launches.append((elements, tile, segs[0][1], len(segs), 1 << log, first, log, aligned))
        self.itab = torch.tensor(rows, dtype=torch.int64).to(device)
        self.starts = torch.tensor(starts, dtype=torch.int64).to(device)
        self.seg_tensor = torch.tensor(self.seg_tensor, dtype=torch.int64)
        self.g_off = torch.tensor(self.g_off, dtype=torch.int64)
        self.seeds = torch.tensor(seeds, dtype=torch.int64)
        self.bf16 = torch.tensor([m.dtype == torch.bfloat16 for m in exp_avgs])
        # one-element tensors whose pointer types the launches' addresses take (no reference to the
        # caller's tensors is kept: a cached plan does not keep a model alive)
        self.witness = [(torch.empty(1, dtype=params[i].dtype, device=device),
                         torch.empty(1, dtype=grads[i].dtype, device=device),
                         torch.empty(1, dtype=exp_avgs[i].dtype, device=device))
                        for _, _, i, *_ in self.launches]


_PLANS: OrderedDict[tuple, _MultiPlan] = OrderedDict()
_PLANS_KEPT = 8


def _multi_plan(params, grads, exp_avgs, vs, geometries, decay, seeds) -> _MultiPlan:
    """The cached plan of these tensors. The key holds every address (a tensor whose storage moved,
    e.g. ``p.data = ...``, gets a new plan) besides shapes, geometries, decay, seeds and dtypes."""
    key = (tuple([p.data_ptr() for p in params]), tuple([m.data_ptr() for m in exp_avgs]),
           tuple([v.data_ptr() for v in vs]), tuple([p.shape for p in params]), tuple(geometries),
           tuple(decay), tuple(seeds), tuple([p.dtype for p in params]), tuple([g.dtype for g in grads]),
           tuple([m.dtype for m in exp_avgs]), params[0].device)
    plan = _PLANS.get(key)
    if plan is None:
        plan = _PLANS[key] = _MultiPlan(params, grads, exp_avgs, vs, geometries, decay, seeds)
        while len(_PLANS) > _PLANS_KEPT:
            _PLANS.popitem(last=False)
    else:
        _PLANS.move_to_end(key)
    return plan


def _step_seeds(bases: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """:func:`blockopt.kernels.momentum.step_seed` for int64 tensors of seeds and steps."""
    m32 = 0xFFFFFFFF
    x = (bases ^ ((steps * 0x9E3779B1) & m32)) & m32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & m32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & m32
    return x ^ (x >> 16)


def _multi_launches(params, grads, exp_avgs, vs, steps, geometries, decay, seeds, *, lr: float, beta1: float,
                    beta2: float, eps: float, weight_decay: float, maximize: bool) -> None:
    """Non-capturable steps of fp32/bf16-momentum tensors (steps already incremented), a launch per
    (per-element or blocks, parameter, gradient and momentum dtypes, tile). The static table comes
    from the cached :class:`_MultiPlan`; per step only the gradients' addresses, the seeds and the
    bias corrections are gathered (vectorised on the host) and copied, in two small transfers."""
    if not params:
        return
    decay = [bool(on and weight_decay != 0) for on in decay]
    plan = _multi_plan(params, grads, exp_avgs, vs, geometries, decay, seeds)
    ts = [s.item() for s in steps]
    scalars = {t: (lr / (1 - beta1**t), (1 - beta2**t) ** 0.5) for t in set(ts)}  # Python floats, as per segment
    per_tensor = torch.tensor([scalars[t] for t in ts], dtype=torch.float64).to(torch.float32)
    t_int = torch.tensor([int(t) for t in ts], dtype=torch.int64)
    seeds_now = torch.where(plan.bf16, _step_seeds(plan.seeds, t_int), 0)
    g_ptrs = torch.tensor([g.data_ptr() for g in grads], dtype=torch.int64)
    seg = plan.seg_tensor
    device = params[0].device
    pin = device.type == "cuda"
    g_addr = g_ptrs[seg] + plan.g_off
    g_aligned = g_addr % 16 == 0
    dyn = torch.stack((g_addr, seeds_now[seg]), dim=1)
    flt = per_tensor[seg]
    if pin:
        dyn, flt = dyn.pin_memory(), flt.pin_memory()
    dtab = dyn.to(device, non_blocking=True)
    ftab = flt.to(device, non_blocking=True)
    i0 = s0 = 0
    for (elements, tile, _, n, padded, programs, log, aligned), (p_like, g_like, m_like) in zip(plan.launches,
                                                                                                 plan.witness):
        aligned = aligned and bool(g_aligned[i0:i0 + n].all())
        with _on(device):
            _multi_kernel[(programs,)](
                plan.itab[i0:i0 + n], dtab[i0:i0 + n], ftab[i0:i0 + n], plan.starts[s0:s0 + padded],
                p_like, g_like, m_like,
                lr, beta2, 1.0 - beta1, 1.0 - beta2, eps, weight_decay,
                ELEMENTS=elements, MAXIMIZE=bool(maximize), TILE=tile, LOG=log, ALIGNED=aligned,
            )
        i0 += n
        s0 += padded
