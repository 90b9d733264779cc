"""The fused CPU step: a small C++ kernel, built once on first use, cached by torch.

:func:`adam_mini_fused_cpu` has the contract of the other step functions in
:mod:`blockopt.kernels.adam_mini`, for the tensors :func:`fused_cpu_supports`
accepts: fp32, contiguous, on the CPU, with blocks that are runs of consecutive
elements (rows, heads, whole tensors, fused row-wise QKV, and per-element blocks
such as biases). Everything else (column blocks, low precision, DTensors) goes
through the foreach path. One call steps every supported parameter of a group:
the C++ side also increments the step counters and computes the bias
corrections, so the Python cost per step does not grow with the work per
parameter.

The kernel is compiled with ``torch.utils.cpp_extension.load`` into a plain
shared library that registers ``torch.ops.blockopt_cpu.adam_mini_step``, the
first time it is needed (about 8 s on two cores; torch caches the build under
``TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``).
When no compiler is available, or ``BLOCKOPT_DISABLE_CPU_KERNEL=1`` is set,
:func:`load_cpu_kernel` returns ``None`` and callers use the foreach path.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import logging
import math
import os
import platform
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from .blocks import FACTORED, Geometry, coordinate_block_ids

__all__ = ["adam_mini_fused_cpu", "column_map", "cpu_kernel_error", "fused_cpu_supports", "load_cpu_kernel", "step_table"]

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("adam_mini_cpu.cpp")
_lock = threading.Lock()
_state: dict[str, object] = {}

#: elements per unit of parallel work (whole blocks are never split)
CHUNK_ELEMENTS = 1 << 17
#: elements per work item of a factored matrix (whole runs of 32 rows; each item sums its columns)
FACTORED_CHUNK_ELEMENTS = 1 << 19
# -fopenmp: at::parallel_for is a header template, so it is only parallel when the extension itself
# is built with OpenMP; the runtime is the libgomp.so.1 that torch has already loaded (same soname).
_CFLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-fopenmp"]
_LDFLAGS = ["-fopenmp"]


def _cpu_tag() -> str:
    """The build uses -march=native: key it by the CPU model so a cache is never reused on another CPU."""
    model = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "flags")):
                    model += line
    except OSError:
        pass
    return hashlib.sha1(model.encode()).hexdigest()[:8]


#: a build lock older than this is left over from a build that was killed: the build takes seconds
STALE_LOCK_SECONDS = 300.0


def clear_stale_lock(build_dir: str | os.PathLike, max_age: float = STALE_LOCK_SECONDS) -> bool:
    """Remove ``build_dir/lock`` when it is older than ``max_age`` seconds (warning once, naming it).

    torch holds that file while it builds an extension and waits, with no timeout, while it exists: a
    build that was killed leaves it behind, and every later load would hang. Returns whether it removed
    one."""
    import time

    lock = Path(build_dir) / "lock"
    try:
        age = time.time() - lock.stat().st_mtime
    except OSError:
        return False
    if age <= max_age:
        return False
    warnings.warn(f"blockopt: removing {lock}, a build lock left {age:.0f} s ago by a build of the fused CPU kernel "
                  "that did not finish (torch would wait for it forever)", stacklevel=3)
    with contextlib.suppress(OSError):
        lock.unlink()
    return True


def _build_dir(name: str) -> str | None:
    try:  # torch's own rule for where load() builds (private; skip the check if it moves)
        from torch.utils.cpp_extension import _get_build_directory

        return _get_build_directory(name, verbose=False)
    except Exception:  # noqa: BLE001 - only a safety check
        return None


def load_cpu_kernel():
    """The compiled extension module, or ``None`` when it cannot be built (see :func:`cpu_kernel_error`)."""
    with _lock:
        if "module" in _state:
            return _state["module"]
        module = None
        if os.environ.get("BLOCKOPT_DISABLE_CPU_KERNEL", "") not in ("", "0"):
            _state["error"] = "disabled by BLOCKOPT_DISABLE_CPU_KERNEL"
        else:
            source = _SOURCE.read_text()
            digest = hashlib.sha1((source + repr(_CFLAGS) + repr(_LDFLAGS)).encode()).hexdigest()[:8]
            try:
                from torch.utils.cpp_extension import load

                name = f"blockopt_adam_mini_cpu_{digest}_{_cpu_tag()}"
                if (build_dir := _build_dir(name)) is not None:
                    clear_stale_lock(build_dir)
                log.info("blockopt: building the fused CPU kernel (once; cached by torch)")
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    # a plain shared library that registers torch.ops.blockopt_cpu.adam_mini_step (no
                    # Python module, so no pybind11 headers to compile)
                    load(
                        name=name,
                        sources=[str(_SOURCE)],
                        extra_cflags=_CFLAGS,
                        extra_ldflags=_LDFLAGS,
                        is_python_module=False,
                        verbose=False,
                    )
                module = torch.ops.blockopt_cpu
            except Exception as e:  # no compiler, no headers, ...: fall back to foreach  # noqa: BLE001 - any failure to build means: no kernel
                _state["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
                log.warning("blockopt: fused CPU kernel unavailable (%s); using the foreach step", _state["error"])
        _state["module"] = module
        return module


def cpu_kernel_error() -> str | None:
    """Why :func:`load_cpu_kernel` returned ``None`` (after it was called)."""
    return _state.get("error")  # type: ignore[return-value]


def fused_cpu_supports(p: torch.Tensor, exp_avg: torch.Tensor, geometry: Geometry, *, wide: bool = False) -> bool:
    """Whether the fused kernel handles this parameter (the gradient is checked at step time);
    ``wide``: it will step an fp32 copy of ``p`` (compact weights), whatever ``p``'s dtype.

    ``exp_avg`` may be fp32, bf16 or int8 (:mod:`blockopt.kernels.momentum`); int8 codes need
    blocks made of whole rows (rows, heads, whole tensors), columns or single elements of a tensor with
    two or more dims, or a factored matrix.
    """
    axis, segments = geometry
    if exp_avg.dtype == torch.int8:  # codes are grouped along rows: blocks of whole rows, columns, or elements
        rows_only = axis in (0, 1, FACTORED) or (axis == -1 and segments[0][1] == segments[0][0]) or (
            axis == -1 and len(segments) == 1 and segments[0][1] == 1)
        if p.dim() < 2 or not rows_only:
            return False
    if axis == 1 and p.dim() != 2:  # column blocks: 2-D tensors stored [in, out]
        return False
    if axis == 2 and (len(segments) != 1 or exp_avg.dtype == torch.int8):  # stacked columns: one segment
        return False
    if axis == FACTORED and p.dim() != 2:
        return False
    return (
        p.device.type == "cpu"
        and (wide or p.dtype == torch.float32)
        and exp_avg.dtype in (torch.float32, torch.bfloat16, torch.int8)
        and p.is_contiguous()
        and exp_avg.is_contiguous()
        and axis in (-1, 0, 1, 2, FACTORED)
        and type(p) in (torch.nn.Parameter, torch.Tensor)  # not DTensor or other subclasses
    )


@functools.lru_cache(maxsize=4096)
def _chunks_of(shape: tuple[int, ...], geometry: Geometry) -> tuple[tuple[int, int, int, int], ...]:
    """(element offset, blocks, block size, v offset) runs, cut into chunks of whole blocks; column
    blocks are one run of block size 0 (the kernel walks the whole tensor)."""
    numel = math.prod(shape)
    axis, segments = geometry
    if axis == FACTORED:  # items of block size -1: runs of rows (from multiples of 32), rows + cols v
        rows, cols = shape
        per = 32 * max(1, FACTORED_CHUNK_ELEMENTS // (32 * max(cols, 1)))
        return tuple((r0 * cols, min(per, rows - r0), -1, 0) for r0 in range(0, rows, per))
    if axis == 1:
        return ((0, geometry.num_blocks, 0, 0),)
    if axis == 2:  # stacked [S, in, out]: one column item per slice
        per = geometry.num_blocks // shape[0]
        return tuple((s * shape[1] * shape[2], per, 0, s * per) for s in range(shape[0]))
    inner = 1 if axis == -1 else (numel // shape[0] if shape else 1)
    out = []
    off = voff = 0
    for size, unit in segments:
        bs = unit * inner
        nb = size // unit
        per_chunk = max(1, CHUNK_ELEMENTS // bs)
        if bs == 1 and len(segments) == 1 and len(shape) >= 2:  # per-element: chunks of whole rows (int8 codes)
            row = numel // shape[0]
            per_chunk = max(row, per_chunk // row * row)
        for j in range(0, nb, per_chunk):
            n = min(per_chunk, nb - j)
            out.append((off + j * bs, n, bs, voff + j))
        off += nb * bs
        voff += nb
    return tuple(out)


@functools.lru_cache(maxsize=256)
def _table(key: tuple[tuple[tuple[int, ...], Geometry], ...]) -> torch.Tensor:
    """The kernel's work items, in memory order, with each item's first element counted over the table."""
    rows = []
    start = 0
    for i, (shape, geometry) in enumerate(key):
        for off, nb, bs, voff in _chunks_of(shape, geometry):
            rows.append((i, off, nb, bs, voff, start))
            start += nb * bs if bs > 0 else nb * shape[-1] if bs == -1 else shape[-2] * shape[-1]
    return torch.tensor(rows, dtype=torch.int64).reshape(-1, 6)


def step_table(shapes: Sequence[tuple[int, ...]], geometries: Sequence[Geometry]) -> torch.Tensor:
    """Work items for parameters of these shapes and geometries (cached); see the C++ source."""
    return _table(tuple(zip(shapes, geometries)))


@functools.lru_cache(maxsize=1024)
def column_map(shape: tuple[int, ...], geometry: Geometry) -> torch.Tensor:
    """Block of every column (int32) for column geometries; an empty tensor otherwise."""
    if geometry.axis == 2:  # one slice's columns (the same in every slice: one segment)
        return coordinate_block_ids(geometry, 0, shape[2]).to(torch.int32)
    if geometry.axis != 1:
        return _EMPTY_INT
    return coordinate_block_ids(geometry).to(torch.int32)


@dataclasses.dataclass(frozen=True)
class FusedCpuTables:
    """What the C++ kernel reads besides the tensors, built once per set of tensors: the work
    table, the decay flags, momentum kinds, int8 scales, stochastic-rounding seeds, column maps."""

    table: torch.Tensor
    decay: torch.Tensor
    kinds: torch.Tensor
    scales: list[torch.Tensor]
    seeds: torch.Tensor
    colmaps: list[torch.Tensor]


def fused_cpu_tables(shapes: Sequence[tuple[int, ...]], geometries: Sequence[Geometry], decay: Sequence[bool],
                     exp_avgs: Sequence[torch.Tensor], scales: Sequence[torch.Tensor | None] | None = None,
                     seeds: Sequence[int] | None = None) -> FusedCpuTables:
    n = len(shapes)
    return FusedCpuTables(
        table=step_table(shapes, geometries),
        decay=torch.tensor(list(decay), dtype=torch.uint8),
        kinds=torch.tensor([_KINDS[m.dtype] for m in exp_avgs], dtype=torch.uint8),
        scales=[s if s is not None else _EMPTY for s in (scales or [None] * n)],
        seeds=torch.tensor(list(seeds or [0] * n), dtype=torch.int64),
        colmaps=[column_map(tuple(shape), geo) for shape, geo in zip(shapes, geometries)],
    )


def fused_cpu_step(tables: FusedCpuTables, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                   exp_avgs: Sequence[torch.Tensor], block_exp_avg_sqs: Sequence[torch.Tensor],
                   state_steps: Sequence[torch.Tensor], *, lr: float, beta1: float, beta2: float, eps: float,
                   weight_decay: float, maximize: bool) -> None:
    """One call of the C++ kernel for every tensor of ``tables``.

    Eagerly the library's op ``torch.ops.blockopt_cpu.adam_mini_step`` is called directly. Under ``torch.compile`` the
    call is the custom op ``torch.ops.blockopt.adam_mini_step``, one node of the graph; ``lr`` may then
    be a 0-dim tensor (a scheduler changes its value without a recompile)."""
    if torch.compiler.is_compiling():
        # a fresh placeholder per parameter without int8 momentum: the op mutates ``scales``, and
        # functionalization wants mutated list entries that do not alias each other
        scales = [s if s.numel() else torch.empty(0) for s in tables.scales]
        lr_t = lr if isinstance(lr, torch.Tensor) else torch.ones((), dtype=torch.float64) * lr  # see dispatch._host
        torch.ops.blockopt.adam_mini_step(
            list(params), list(grads), list(exp_avgs), list(block_exp_avg_sqs), list(state_steps), tables.table,
            tables.decay, lr_t, beta1, beta2, eps, weight_decay, maximize, tables.kinds, scales, tables.seeds,
            tables.colmaps)
        return
    _kernel().adam_mini_step(
        list(params), list(grads), list(exp_avgs), list(block_exp_avg_sqs), list(state_steps), tables.table,
        tables.decay, lr, beta1, beta2, eps, weight_decay, maximize, tables.kinds, tables.scales, tables.seeds,
        tables.colmaps,
    )


def _kernel():
    module = load_cpu_kernel()
    if module is None:
        raise RuntimeError(f"the fused CPU kernel is unavailable: {cpu_kernel_error()}")
    return module


# The kernel as a torch.library custom op: what torch.compile records (one opaque node; Dynamo
# cannot trace into the extension module). ``mutates_args`` names every tensor the kernel writes,
# so functionalization (AOTAutograd) copies the results back into them; the fake implementation
# returns nothing, as the kernel does. Types are spelled out: the schema is read from them.
@torch.library.custom_op(
    "blockopt::adam_mini_step", mutates_args=("params", "exp_avgs", "block_exp_avg_sqs", "state_steps", "scales"),
    device_types="cpu")
def _adam_mini_step_op(
    params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
    block_exp_avg_sqs: list[torch.Tensor], state_steps: list[torch.Tensor], table: torch.Tensor, decay: torch.Tensor,
    lr: torch.Tensor, beta1: float, beta2: float, eps: float, weight_decay: float, maximize: bool,
    kinds: torch.Tensor, scales: list[torch.Tensor], seeds: torch.Tensor, colmaps: list[torch.Tensor],
) -> None:
    _kernel().adam_mini_step(params, grads, exp_avgs, block_exp_avg_sqs, state_steps, table, decay, lr.item(), beta1,
                             beta2, eps, weight_decay, maximize, kinds, scales, seeds, colmaps)


@_adam_mini_step_op.register_fake
def _adam_mini_step_fake(
    params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
    block_exp_avg_sqs: list[torch.Tensor], state_steps: list[torch.Tensor], table: torch.Tensor, decay: torch.Tensor,
    lr: torch.Tensor, beta1: float, beta2: float, eps: float, weight_decay: float, maximize: bool,
    kinds: torch.Tensor, scales: list[torch.Tensor], seeds: torch.Tensor, colmaps: list[torch.Tensor],
) -> None:
    """Only in-place writes (declared in ``mutates_args``): no outputs, no metadata changes."""


def adam_mini_fused_cpu(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    block_exp_avg_sqs: Sequence[torch.Tensor],
    state_steps: Sequence[torch.Tensor],
    geometries: Sequence[Geometry],
    decay: Sequence[bool],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    maximize: bool,
    exp_avg_scales: Sequence[torch.Tensor | None] | None = None,
    seeds: Sequence[int] | None = None,
) -> None:
    """One fused pass per block; same contract as :func:`~blockopt.kernels.adam_mini_foreach`.

    ``exp_avgs`` may also be compact (bf16, or int8 with ``exp_avg_scales``); ``seeds`` are the
    parameters' base seeds for stochastic rounding (:func:`blockopt.kernels.momentum.name_seed`).
    """
    if not params:
        return
    tables = fused_cpu_tables([tuple(p.shape) for p in params], geometries, decay, exp_avgs, exp_avg_scales, seeds)
    fused_cpu_step(tables, params, grads, exp_avgs, block_exp_avg_sqs, state_steps, lr=lr, beta1=beta1,
                   beta2=beta2, eps=eps, weight_decay=weight_decay, maximize=maximize)


_KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.int8: 2}
_EMPTY = torch.empty(0)
_EMPTY_INT = torch.empty(0, dtype=torch.int32)
