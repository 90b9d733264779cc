"""Hessian-vector products of a model's loss on one batch, restricted to any parameter subset.

:class:`HessianOperator` runs the forward pass and the gradient (with
``create_graph=True``) **once**, keeps that graph, and answers every product
``H v`` with one more backward pass through it (double backward,
``retain_graph=True``). Products are therefore cheap and all of them see the
very same loss: same batch, same dropout decisions (none), same batch-norm
statistics. The graph costs memory proportional to the batch, which the
operator estimates before it builds anything (:func:`estimate_hvp_memory`).

The Hessian is the one of the loss the user trains, made deterministic:

* **Modes** (``mode=``). ``"measure"`` (default): every module goes to eval
  mode (no dropout, including the functional dropout that attention modules
  apply when ``self.training``), except batch-norm layers that were training,
  which keep using the batch's statistics (the training objective) while
  their running statistics are restored afterwards. ``"eval"``: the whole
  model in eval mode (batch norm uses running statistics, as PyHessian does).
  ``"train"``: the modes as the user left them; any randomness (dropout) is
  drawn once from ``seed``. In every case the ``training`` flag of every
  module and the batch-norm buffers are put back as they were as soon as the
  graph is built: the user's model is not changed.
* **Randomness**: the forward runs inside ``torch.random.fork_rng`` seeded
  with ``seed``, so the user's generator state is untouched and two operators
  with the same seed are identical.
* **Attention kernels**: fused scaled-dot-product-attention kernels
  (flash / memory-efficient, also the CPU flash kernel) have no double
  backward. The forward runs under ``sdpa_kernel(SDPBackend.MATH)``
  (``sdpa_math=True``), which is differentiable twice and computes the same
  function (up to rounding).

When double backward is impossible (an op whose derivative is not
differentiable, a custom ``autograd.Function`` marked ``@once_differentiable``),
the operator finds the operation while building the graph and raises
:class:`DoubleBackwardError` naming it, instead of failing later inside
Lanczos or -- worse -- silently treating its gradient as constant.

Performance on CPUs: products of small models are many small kernels, which
run fastest on one thread (``torch.set_num_threads(1)``) and slow down by
orders of magnitude when a second thread waits on a busy core; float32
products of small curvatures produce denormal numbers, which are ~100x slower
unless flushed (``torch.set_flush_denormal(True)``). The library changes
neither global setting; ``blockopt hessian`` sets both for its own run.

Vectors: ``matvec`` takes and returns flat 1-D vectors over the selected
parameters in selection order (``op.names``), in any floating dtype; the
product is computed in the parameters' dtype and returned in the input's.
:meth:`HessianOperator.restrict` gives the operator of a sub-block (some of
the tensors, or a slice of one tensor given by flat indices): ``H_bb v`` with
``v`` zero outside the block, computed without materialising the other
coordinates.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from typing_extensions import Self

from ..utils import fmt_bytes as _fmt_bytes

__all__ = [
    "BatchTooLargeError",
    "DoubleBackwardError",
    "HessianInputError",
    "HessianOperator",
    "MatrixOperator",
    "MemoryEstimate",
    "default_loss",
    "estimate_hvp_memory",
    "hvp",
    "measurement_mode",
    "select_parameters",
]

log = logging.getLogger(__name__)

MODES = ("measure", "eval", "train")
#: how much of the available memory a run may plan to use
MEMORY_HEADROOM = 0.9


class HessianInputError(ValueError):
    """Bad input to the Hessian toolkit: the message names the argument, the value and what is allowed."""


class BatchTooLargeError(HessianInputError):
    """The graph for Hessian-vector products of this batch would not fit in memory (estimated before starting)."""


class DoubleBackwardError(RuntimeError):
    """Double backward (needed for Hessian-vector products) is impossible through an operation of the model.

    ``operations`` lists the autograd nodes found to block it (e.g.
    ``"ScaledDotProductFlashAttentionForCpuBackward0"`` or ``"MyFunction"``).
    """

    def __init__(self, message: str, operations: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.operations = tuple(operations)


# ---------------------------------------------------------------------------
# parameter selection


def _named_unique_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter, list[str]]]:
    """(canonical name, parameter, aliases) for every distinct parameter, in registration order."""
    seen: dict[int, tuple[str, nn.Parameter, list[str]]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            seen[id(p)][2].append(name)
        else:
            seen[id(p)] = (name, p, [])
    return list(seen.values())


def select_parameters(
    model: nn.Module, params: str | Sequence[str | torch.Tensor] | None = None
) -> tuple[list[str], list[torch.Tensor]]:
    """Resolve a parameter subset to ``(names, tensors)`` in the model's registration order.

    ``params`` is ``None`` (every parameter that requires grad), a regular
    expression (``re.fullmatch`` on the name or an alias of a tied weight), a
    list of such patterns / exact names, or a list of the model's parameter
    tensors. Every pattern must match at least one parameter; a pattern that
    matches nothing, a tensor that is not a parameter of ``model`` and a
    parameter with ``requires_grad=False`` are errors (:class:`HessianInputError`).
    """
    if not isinstance(model, nn.Module):
        raise HessianInputError(f"Invalid model: expected an nn.Module, got {type(model).__name__}")
    entries = _named_unique_parameters(model)
    if not entries:
        raise HessianInputError("Invalid model: it has no parameters")
    sample = [n for n, _, _ in entries[:4]]
    if params is None:
        chosen = [(n, p) for n, p, _ in entries if p.requires_grad]
        if not chosen:
            raise HessianInputError("Invalid model: no parameter requires grad (params=None selects those that do)")
        return [n for n, _ in chosen], [p for _, p in chosen]
    items: list[Any] = [params] if isinstance(params, (str, torch.Tensor)) else list(params)
    if not items:
        raise HessianInputError("Invalid params: an empty list; expected None, a pattern, names or tensors")
    picked: set[int] = set()
    by_id = {id(p): (n, p) for n, p, _ in entries}
    for item in items:
        if isinstance(item, torch.Tensor):
            if id(item) not in by_id:
                raise HessianInputError(
                    f"Invalid params: a tensor of shape {list(item.shape)} is not a parameter of the model"
                )
            picked.add(id(item))
            continue
        if not isinstance(item, str):
            raise HessianInputError(f"Invalid params entry: {item!r}; expected a name/pattern string or a parameter")
        try:
            regex = re.compile(item)
        except re.error as e:
            raise HessianInputError(f"Invalid params pattern {item!r}: {e}") from None
        hits = [p for n, p, aliases in entries if regex.fullmatch(n) or any(regex.fullmatch(a) for a in aliases)]
        if not hits:
            raise HessianInputError(
                f"Invalid params: pattern {item!r} matches no parameter (full match on names, which look like {sample})"
            )
        picked.update(id(p) for p in hits)
    frozen = [by_id[i][0] for i in picked if not by_id[i][1].requires_grad]
    if frozen:
        raise HessianInputError(
            f"Invalid params: {frozen[:4]} have requires_grad=False; select trainable parameters "
            "or set requires_grad=True on them first"
        )
    chosen = [(n, p) for n, p, _ in entries if id(p) in picked]
    return [n for n, _ in chosen], [p for _, p in chosen]


# ---------------------------------------------------------------------------
# modes, randomness, loss


def _uses_batch_statistics(m: nn.Module) -> bool:
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        return True
    return isinstance(m, nn.modules.instancenorm._InstanceNorm) and m.track_running_stats


@contextlib.contextmanager
def measurement_mode(model: nn.Module, mode: str = "measure") -> Iterator[None]:
    """Put ``model`` in the measurement mode (see the module docstring); restore everything on exit.

    Restores every module's ``training`` flag (directly, so ``train()``
    overrides are not called twice) and the buffers of batch/instance-norm
    layers (running statistics, ``num_batches_tracked``).
    """
    if mode not in MODES:
        raise HessianInputError(f"Invalid mode: {mode!r}; allowed: {', '.join(map(repr, MODES))}")
    flags = [(m, m.training) for m in model.modules()]
    # Batch/instance norms update their running statistics in place during a training-mode forward,
    # and save them for backward. So the forward works on clones, and the user's own buffer tensors
    # (never touched) are put back afterwards; the graph keeps the clones.
    norm_buffers = []
    for m in model.modules():
        if _uses_batch_statistics(m):
            saved = {k: b for k, b in m.named_buffers(recurse=False) if b is not None}
            norm_buffers.append((m, saved))
            for k, b in saved.items():
                setattr(m, k, b.clone())
    try:
        if mode in ("measure", "eval"):
            model.eval()
        if mode == "measure":
            for m, was_training in flags:
                if was_training and _uses_batch_statistics(m):
                    m.training = True  # batch statistics, as in training; buffers restored below
        yield
    finally:
        for m, was_training in flags:
            m.training = was_training
        for m, saved in norm_buffers:
            for k, b in saved.items():
                setattr(m, k, b)


def _param_devices(tensors: Sequence[torch.Tensor]) -> list[int]:
    return sorted({t.device.index or 0 for t in tensors if t.device.type == "cuda"})


@contextlib.contextmanager
def _seeded(seed: int, tensors: Sequence[torch.Tensor]) -> Iterator[None]:
    with torch.random.fork_rng(devices=_param_devices(tensors)):
        torch.manual_seed(seed)
        yield


def _sdpa_math(enabled: bool):
    if not enabled:
        return contextlib.nullcontext()
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - torch < 2.3
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.MATH])


def default_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    """The loss when ``loss_fn`` is not given: ``model(*batch)`` for a tuple/list,
    ``model(**batch)`` for a mapping, ``model(batch)`` otherwise; the result is the
    loss itself (a scalar tensor) or has one as ``.loss`` / ``["loss"]`` (Hugging Face)."""
    if isinstance(batch, Mapping):
        out = model(**batch)
    elif isinstance(batch, (tuple, list)):
        out = model(*batch)
    else:
        out = model(batch)
    if isinstance(out, torch.Tensor):
        return out
    loss = getattr(out, "loss", None)
    if loss is None and isinstance(out, Mapping):
        loss = out.get("loss")
    if loss is None:
        raise HessianInputError(
            f"Invalid loss: the model returned {type(out).__name__}, not a scalar loss and nothing with a "
            "'loss' field; pass loss_fn=lambda model, batch: ... that returns the scalar loss"
        )
    return loss


def _compute_loss(model: nn.Module, batch: Any, loss_fn: Callable | None) -> torch.Tensor:
    loss = (loss_fn or default_loss)(model, batch)
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        shape = list(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise HessianInputError(f"Invalid loss: expected a scalar tensor, got {shape}")
    if not loss.requires_grad:
        raise HessianInputError(
            "Invalid loss: it does not require grad (computed under no_grad, or independent of every parameter)"
        )
    return loss.reshape(())


# ---------------------------------------------------------------------------
# memory estimate


@dataclass(frozen=True)
class MemoryEstimate:
    """Estimated bytes for the retained double-backward graph of a batch.

    ``total = fixed + batch_size * per_example``, measured by counting the
    tensors autograd saves (``saved_tensors_hooks``) during the forward and
    the ``create_graph`` backward of 2- and 4-example slices, plus the
    gradients and a few parameter-sized work vectors. A rough estimate:
    allocator overheads and transient buffers are not counted.
    """

    batch_size: int | None
    per_example: int
    fixed: int
    total: int
    available: int | None

    @property
    def fits(self) -> bool:
        return self.available is None or self.total <= MEMORY_HEADROOM * self.available

    def max_batch(self) -> int | None:
        if self.available is None or self.per_example <= 0:
            return None
        return max(0, int((MEMORY_HEADROOM * self.available - self.fixed) // self.per_example))




def available_memory(device: torch.device) -> int | None:
    """Free bytes on ``device``: ``torch.cuda.mem_get_info`` on CUDA, ``MemAvailable`` on Linux CPUs; else ``None``."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def _batch_size(batch: Any) -> int | None:
    """Leading size of the batch's tensors, if they agree; else ``None``."""
    sizes = set()

    def visit(x: Any) -> None:
        if isinstance(x, torch.Tensor):
            if x.dim() > 0:
                sizes.add(x.shape[0])
        elif isinstance(x, Mapping):
            for v in x.values():
                visit(v)
        elif isinstance(x, (tuple, list)):
            for v in x:
                visit(v)

    visit(batch)
    return sizes.pop() if len(sizes) == 1 else None


def _slice_batch(batch: Any, n: int) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch[:n] if batch.dim() > 0 else batch
    if isinstance(batch, Mapping):
        return {k: _slice_batch(v, n) for k, v in batch.items()}
    if isinstance(batch, tuple):
        return tuple(_slice_batch(v, n) for v in batch)
    if isinstance(batch, list):
        return [_slice_batch(v, n) for v in batch]
    return batch


def _saved_bytes(model, batch, loss_fn, tensors, mode, seed, sdpa_math) -> int:
    seen: set[tuple] = set()
    total = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = (t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if key not in seen:
            seen.add(key)
            total[0] += t.numel() * t.element_size()
        return t

    with (measurement_mode(model, mode), _seeded(seed, tensors), _sdpa_math(sdpa_math),
          torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)):
        loss = _compute_loss(model, batch, loss_fn)
        torch.autograd.grad(loss, tensors, create_graph=True, allow_unused=True)
    return total[0]


def estimate_hvp_memory(
    model: nn.Module,
    batch: Any,
    loss_fn: Callable | None = None,
    params: str | Sequence[str | torch.Tensor] | None = None,
    *,
    mode: str = "measure",
    seed: int = 0,
    sdpa_math: bool = True,
    available: int | None = None,
) -> MemoryEstimate | None:
    """Estimate the memory of a :class:`HessianOperator` on ``batch`` before building it.

    Runs the forward and ``create_graph`` backward on the first 2 and 4
    examples only (the batch's tensors are sliced along dim 0; two examples at
    least, so batch norm works), counts the bytes autograd saves, and
    extrapolates linearly in the batch size. A batch of at most 4 examples is
    measured whole. ``available`` defaults to :func:`available_memory` of the
    parameters' device. Returns ``None`` (and logs why) when the batch cannot
    be sliced: its tensors disagree on dim 0, or the loss fails on a slice.
    """
    _, tensors = select_parameters(model, params)
    device = tensors[0].device
    param_bytes = sum(t.numel() * t.element_size() for t in tensors)
    if available is None:
        available = available_memory(device)
    b = _batch_size(batch)
    extra = 4 * param_bytes  # gradients, product, two work vectors
    if b is not None and b <= 4:
        whole = _saved_bytes(model, batch, loss_fn, tensors, mode, seed, sdpa_math)
        return MemoryEstimate(b, whole // b, extra, whole + extra, available)
    if b is None:
        log.warning("blockopt.hessian: memory not estimated: the batch has no common leading (batch) dimension")
        return None
    try:
        s2 = _saved_bytes(model, _slice_batch(batch, 2), loss_fn, tensors, mode, seed, sdpa_math)
        s4 = _saved_bytes(model, _slice_batch(batch, 4), loss_fn, tensors, mode, seed, sdpa_math)
    except (RuntimeError, ValueError, IndexError, TypeError) as e:
        log.warning("blockopt.hessian: memory not estimated: the loss fails on a 2-example slice of the batch (%s)", e)
        return None
    per = max((s4 - s2) // 2, 0)
    fixed = max(s2 - 2 * per, 0) + extra
    return MemoryEstimate(b, per, fixed, fixed + b * per, available)


# ---------------------------------------------------------------------------
# double-backward diagnosis


def _graph_nodes(root: Any) -> list[Any]:
    out, seen, stack = [], set(), [root]
    while stack:
        n = stack.pop()
        if n is None or n in seen:
            continue
        seen.add(n)
        out.append(n)
        stack.extend(f for f, _ in n.next_functions)
    return out


def _once_differentiable(node: Any) -> bool:
    cls = getattr(node, "_forward_cls", None)
    backward = getattr(cls, "backward", None)
    wrapped = getattr(backward, "__wrapped__", None)
    code = getattr(backward, "__code__", None)
    return wrapped is not None and code is not None and code.co_filename.replace(os.sep, "/").endswith(
        "torch/autograd/function.py")


def _op_label(node: Any) -> str:
    cls = getattr(node, "_forward_cls", None)
    if cls is not None:
        return f"{cls.__qualname__} (custom autograd.Function)"
    return node.name()


_BLOCKING = ("NotImplemented", "DelayedError", "Error")


def _blocking_grad_fn(t: torch.Tensor | None) -> bool:
    return t is not None and t.grad_fn is not None and type(t.grad_fn).__name__ in _BLOCKING


# ---------------------------------------------------------------------------
# operators


class MatrixOperator:
    """A dense symmetric matrix as an operator (tests, and small dense problems)."""

    def __init__(self, matrix: torch.Tensor) -> None:
        if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
            raise HessianInputError(f"Invalid matrix: expected a square 2-D tensor, got shape {list(matrix.shape)}")
        self.matrix = matrix
        self.numel = matrix.shape[0]
        self.dtype = matrix.dtype
        self.device = matrix.device
        self.matvecs = 0

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        self.matvecs += 1
        return (self.matrix @ v.to(self.matrix.dtype)).to(v.dtype)

    __call__ = matvec


class HessianOperator:
    """``H``: the Hessian of ``loss_fn(model, batch)`` with respect to a parameter subset.

    Args:
        model: the ``nn.Module``; it is left as it was (modes, buffers, RNG).
        batch: anything ``loss_fn`` accepts; the same batch for every product.
        loss_fn: ``loss_fn(model, batch) -> scalar``; default :func:`default_loss`.
        params: which parameters (see :func:`select_parameters`); ``None``: all trainable.
        seed: seeds the forward (any randomness left in ``mode="train"``).
        mode: ``"measure"`` (default), ``"eval"`` or ``"train"``; see the module docstring.
        sdpa_math: run attention through the twice-differentiable math SDPA kernel.
        check_memory: estimate the graph's memory first (:func:`estimate_hvp_memory`)
            and raise :class:`BatchTooLargeError` if it does not fit.
        max_memory: bytes the graph may use (default: the device's free memory).

    Attributes: ``names``, ``shapes``, ``numel`` (dimension of ``H``), ``loss``
    (the detached loss value), ``gradient`` (flat detached gradient), ``matvecs``
    (products computed so far), ``memory`` (the :class:`MemoryEstimate` or ``None``).

    Example::

        >>> op = HessianOperator(model, (x, y), params=r"blocks\\.0\\..*")
        >>> hv = op.matvec(torch.randn(op.numel, dtype=torch.float64))
        >>> q = op.restrict("blocks.0.attn.q_proj.weight")      # H_qq only
    """

    def __init__(
        self,
        model: nn.Module,
        batch: Any,
        loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
        params: str | Sequence[str | torch.Tensor] | None = None,
        *,
        seed: int = 0,
        mode: str = "measure",
        sdpa_math: bool = True,
        check_memory: bool = True,
        max_memory: int | None = None,
    ) -> None:
        if mode not in MODES:
            raise HessianInputError(f"Invalid mode: {mode!r}; allowed: {', '.join(map(repr, MODES))}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise HessianInputError(f"Invalid seed: {seed!r}; expected an int")
        self.names, self.params = select_parameters(model, params)
        self.shapes = [tuple(p.shape) for p in self.params]
        self.sizes = [p.numel() for p in self.params]
        self.offsets = [0]
        for s in self.sizes:
            self.offsets.append(self.offsets[-1] + s)
        self.numel = self.offsets[-1]
        self.dtype = self.params[0].dtype
        self.device = self.params[0].device
        self.model = model
        self.mode = mode
        self.seed = seed
        self.matvecs = 0
        self.memory: MemoryEstimate | None = None
        if check_memory:
            self.memory = estimate_hvp_memory(
                model, batch, loss_fn, self.params, mode=mode, seed=seed, sdpa_math=sdpa_math, available=max_memory
            )
            if self.memory is not None and not self.memory.fits:
                m = self.memory
                hint = f"use a batch of at most {m.max_batch()} examples" if m.max_batch() else "use a smaller model"
                where = "max_memory" if max_memory is not None else f"free memory on {self.device}"
                raise BatchTooLargeError(
                    f"Invalid batch: {m.batch_size} examples would need about {_fmt_bytes(m.total)} for the "
                    f"double-backward graph ({_fmt_bytes(m.per_example)} per example + {_fmt_bytes(m.fixed)} fixed, "
                    f"measured on 2 and 4 examples), but {where} is {_fmt_bytes(m.available)}; {hint} "
                    f"(nothing was started)"
                )
        self._build(batch, loss_fn, sdpa_math)

    # -- building ------------------------------------------------------
    def _build(self, batch: Any, loss_fn: Callable | None, sdpa_math: bool) -> None:
        blocked: dict[Any, str] = {}
        handles = []
        with measurement_mode(self.model, self.mode), _seeded(self.seed, self.params), _sdpa_math(sdpa_math):
            loss = _compute_loss(self.model, batch, loss_fn)
            nodes = _graph_nodes(loss.grad_fn)

            # Hooks fire only for the nodes the gradient of the *selected* parameters runs through.
            def make_hook(node: Any) -> Callable:
                once = _once_differentiable(node)

                def hook(grad_inputs, grad_outputs):
                    if once:
                        blocked[node] = "its backward is marked @once_differentiable"
                    elif any(_blocking_grad_fn(g) for g in grad_inputs):
                        blocked.setdefault(node, "its derivative is not differentiable (no double backward)")
                return hook

            try:
                for node in nodes:
                    if node.name() != "torch::autograd::AccumulateGrad":
                        handles.append(node.register_hook(make_hook(node)))
                grads = torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True)
            finally:
                for h in handles:
                    h.remove()
        # Nodes that blocked a path that does not lead to the selected parameters do not matter:
        # check whether the gradients' own graphs reach an error node.
        reached = set()
        for g in grads:
            if g is not None and g.grad_fn is not None:
                reached.update(type(n).__name__ for n in _graph_nodes(g.grad_fn))
        once = [n for n, why in blocked.items() if "once_differentiable" in why]
        real = [n for n, why in blocked.items() if "once_differentiable" not in why]
        if once or (real and any(r in _BLOCKING for r in reached)):
            ops = [_op_label(n) for n in (once + real)]
            detail = "; ".join(f"{_op_label(n)}: {blocked[n]}" for n in (once + real))
            torch_msg = self._trial_error(grads)
            hint = ""
            if any("Attention" in o or "attention" in o for o in ops):
                hint = (" Fused attention kernels have no double backward; blockopt already runs SDPA with the math "
                        "backend, so this kernel is called directly (e.g. flash-attention): use an eager attention "
                        "implementation (Hugging Face: attn_implementation='eager').")
            raise DoubleBackwardError(
                f"Hessian-vector products need double backward, which is impossible through {ops[0]}"
                f" ({detail}).{hint}" + (f" PyTorch says: {torch_msg}" if torch_msg else ""),
                ops,
            )
        self.loss = loss.detach()
        self._grads = list(grads)
        # unused parameters (not reaching the loss) and gradients that do not depend on any parameter
        # (the loss is linear there) have zero Hessian rows
        self._live = [g is not None and g.requires_grad for g in grads]
        self.gradient = torch.cat(
            [(g.detach() if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, self.params)]
        )

    def _trial_error(self, grads: Sequence[torch.Tensor | None]) -> str:
        live = [(g, p) for g, p in zip(grads, self.params) if g is not None and g.requires_grad]
        if not live:
            return ""
        try:
            torch.autograd.grad([g for g, _ in live], [p for _, p in live],
                                grad_outputs=[torch.ones_like(g) for g, _ in live], retain_graph=True,
                                allow_unused=True)
        except RuntimeError as e:
            return str(e).splitlines()[0]
        return ""

    # -- products ------------------------------------------------------
    def _products(self, idx: Sequence[int], vecs: Sequence[torch.Tensor], batched: bool = False) -> list[torch.Tensor]:
        """``[H v]_i`` for ``i in idx`` with ``v`` given on the tensors ``idx`` (zero elsewhere)."""
        live = [j for j, i in enumerate(idx) if self._live[i]]
        outs: list[torch.Tensor] = [torch.zeros_like(v) for v in vecs]
        if not live:
            return outs
        res = torch.autograd.grad(
            [self._grads[idx[j]] for j in live],
            [self.params[i] for i in idx],
            grad_outputs=[vecs[j] for j in live],
            retain_graph=True,
            allow_unused=True,
            is_grads_batched=batched,
        )
        return [r if r is not None else o for r, o in zip(res, outs)]

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """``H v`` for a flat vector over the selected parameters (any float dtype; returned in it)."""
        return self.restrict().matvec(v)

    __call__ = matvec

    def hvp(self, vectors: Mapping[str, torch.Tensor] | Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        """``H v`` with ``v`` given per tensor (missing names are zero); returns ``{name: tensor}``."""
        if isinstance(vectors, Mapping):
            unknown = [k for k in vectors if k not in self.names]
            if unknown:
                raise HessianInputError(f"Invalid vectors: {unknown} are not among the selected parameters {self.names[:4]}...")
            vecs = [vectors.get(n) for n in self.names]
        else:
            vecs = list(vectors)
            if len(vecs) != len(self.names):
                raise HessianInputError(f"Invalid vectors: {len(vecs)} tensors for {len(self.names)} parameters")
        idx = [i for i, v in enumerate(vecs) if v is not None]
        for i in idx:
            if tuple(vecs[i].shape) != self.shapes[i]:
                raise HessianInputError(
                    f"Invalid vectors[{self.names[i]!r}]: shape {list(vecs[i].shape)}, expected {list(self.shapes[i])}"
                )
        self.matvecs += 1
        allidx = list(range(len(self.names)))
        full = [vecs[i].to(self.dtype) if vecs[i] is not None else torch.zeros_like(p) for i, p in enumerate(self.params)]
        out = self._products(allidx, full)
        return {n: o.detach() for n, o in zip(self.names, out)}

    def restrict(self, params: str | Sequence[str] | None = None, index: torch.Tensor | None = None) -> BlockOperator:
        """The operator ``H_bb`` of a block: some selected tensors (names / patterns), or, with
        ``index`` (flat int64 indices into one tensor), a slice of one tensor."""
        if params is None:
            idx = list(range(len(self.names)))
        else:
            pats = [params] if isinstance(params, str) else list(params)
            idx = []
            for pat in pats:
                hits = [i for i, n in enumerate(self.names) if n == pat or re.fullmatch(pat, n)]
                if not hits:
                    raise HessianInputError(
                        f"Invalid block: {pat!r} matches none of the operator's parameters (e.g. {self.names[:4]})"
                    )
                idx.extend(h for h in hits if h not in idx)
            idx.sort()
        if index is not None:
            if len(idx) != 1:
                raise HessianInputError(f"Invalid block: index= needs exactly one tensor, got {len(idx)}")
            index = torch.as_tensor(index, dtype=torch.long).reshape(-1)
            n = self.sizes[idx[0]]
            if index.numel() == 0 or int(index.min()) < 0 or int(index.max()) >= n:
                raise HessianInputError(f"Invalid block index: expected flat indices in [0, {n}) for {self.names[idx[0]]!r}")
        return BlockOperator(self, idx, index)

    def close(self) -> None:
        """Free the retained graph (the operator cannot compute products afterwards)."""
        self._grads = []
        self._live = []

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"HessianOperator({len(self.names)} tensors, n={self.numel:,}, loss={self.loss.item():.4g})"


class BlockOperator:
    """``H_bb`` for a block ``b`` of a :class:`HessianOperator` (see :meth:`HessianOperator.restrict`)."""

    def __init__(self, parent: HessianOperator, idx: Sequence[int], index: torch.Tensor | None) -> None:
        if not parent._grads:
            raise HessianInputError("Invalid operator: it was closed")
        self.parent = parent
        self.idx = list(idx)
        self.index = None if index is None else index.to(parent.device)
        self.names = [parent.names[i] for i in self.idx]
        self.numel = int(index.numel()) if index is not None else sum(parent.sizes[i] for i in self.idx)
        self.dtype = parent.dtype
        self.device = parent.device

    @property
    def matvecs(self) -> int:
        return self.parent.matvecs

    def _split(self, v: torch.Tensor) -> list[torch.Tensor]:
        p = self.parent
        if self.index is not None:
            i = self.idx[0]
            full = torch.zeros(p.sizes[i], dtype=p.dtype, device=p.device)
            full[self.index] = v.to(p.dtype)
            return [full.view(p.shapes[i])]
        out, start = [], 0
        for i in self.idx:
            out.append(v[start:start + p.sizes[i]].to(p.dtype).view(p.shapes[i]))
            start += p.sizes[i]
        return out

    def _join(self, outs: Sequence[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        if self.index is not None:
            return outs[0].reshape(-1)[self.index].to(dtype)
        return torch.cat([o.reshape(-1) for o in outs]).to(dtype)

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        if v.dim() != 1 or v.numel() != self.numel:
            raise HessianInputError(f"Invalid vector: shape {list(v.shape)}, expected a flat vector of {self.numel}")
        if not self.parent._grads:
            raise HessianInputError("Invalid operator: it was closed")
        self.parent.matvecs += 1
        outs = self.parent._products(self.idx, self._split(v.to(self.device)))
        return self._join([o.detach() for o in outs], v.dtype).to(v.device)

    __call__ = matvec

    def matmat(self, V: torch.Tensor, chunk: int = 64) -> torch.Tensor:
        """``H V`` for the columns of ``V`` (``[numel, k]``), batched with ``is_grads_batched`` where the
        model supports it (``vmap`` over the double backward), one column at a time otherwise."""
        if V.dim() != 2 or V.shape[0] != self.numel:
            raise HessianInputError(f"Invalid matrix: shape {list(V.shape)}, expected [{self.numel}, k]")
        cols = []
        batched_ok = True
        for s in range(0, V.shape[1], chunk):
            block = V[:, s:s + chunk]
            if batched_ok:
                try:
                    parts = [self._split(c) for c in block.T]
                    stacked = [torch.stack([p[j] for p in parts]) for j in range(len(self.idx))]
                    outs = self.parent._products(self.idx, stacked, batched=True)
                    self.parent.matvecs += block.shape[1]
                    res = torch.stack([self._join([o[k].detach() for o in outs], V.dtype) for k in range(block.shape[1])], 1)
                    cols.append(res)
                    continue
                except RuntimeError as e:  # vmap unsupported for some op: fall back to a loop
                    log.debug("batched Hessian-vector products unavailable (%s); using a loop", e)
                    batched_ok = False
            cols.append(torch.stack([self.matvec(c) for c in block.T], 1))
        return torch.cat(cols, 1)


def hvp(
    model: nn.Module,
    batch: Any,
    vector: Mapping[str, torch.Tensor] | torch.Tensor,
    loss_fn: Callable | None = None,
    params: str | Sequence[str | torch.Tensor] | None = None,
    *,
    seed: int = 0,
    mode: str = "measure",
) -> dict[str, torch.Tensor] | torch.Tensor:
    """One Hessian-vector product (builds a :class:`HessianOperator`; reuse one for many products).

    ``vector`` is a flat tensor over the selected parameters (returns a flat
    tensor) or ``{name: tensor}`` (returns ``{name: tensor}``).
    """
    with HessianOperator(model, batch, loss_fn, params, seed=seed, mode=mode) as op:
        if isinstance(vector, torch.Tensor):
            return op.matvec(vector)
        return op.hvp(vector)


def operator_numel(op: Any) -> int:
    n = getattr(op, "numel", None)
    if isinstance(n, int):
        return n
    raise HessianInputError(f"Invalid operator: {type(op).__name__} has no integer 'numel' (its dimension)")

