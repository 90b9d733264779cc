"""Live tensor bytes during a training step, and what they are at the worst point.

:class:`LiveStorages` is a ``TorchDispatchMode``: every op's outputs have their untyped storages
registered once (keyed by ``data_ptr()``), and a ``weakref.finalize`` on each storage takes its bytes
off the running total when it is freed. Storages made before the mode starts (parameters, buffers,
gradients, optimizer state) are registered with :meth:`LiveStorages.add`. On CPU the autograd engine
runs backward on the calling thread with the mode in force, so gradients are seen as they are made.

:class:`PeakRecorder` watches the total: whenever it passes the last recorded peak by more than
0.2 %, and at the end of each phase (forward, backward, step), it splits the live bytes into
``weights`` (the parameters, and state under the key ``weight_remainder``), ``grads`` (``p.grad``),
``state`` (every other tensor of ``optimizer.state``), ``activations`` (tensors saved for backward,
found by a ``saved_tensors_hooks`` pack hook) and ``other``. Each storage counts once, in the first
of these that holds it.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass
from torch.utils._pytree import tree_leaves

__all__ = ["CATEGORIES", "Breakdown", "LiveStorages", "PeakRecorder", "optimizer_tensors", "storages_of"]

CATEGORIES = ("weights", "grads", "state", "activations", "other")
#: the state key under which an optimizer keeps extra bits of the weights (AdamMini(weights=...))
WEIGHT_KEYS = frozenset({"weight_remainder"})


def storages_of(t: torch.Tensor) -> Iterator[torch.UntypedStorage]:
    """The untyped storages that hold ``t``'s data: its own, or those of a wrapper subclass's inner tensors
    (torchao's quantized states). Meta tensors and tensors without storage hold none."""
    if is_traceable_wrapper_subclass(t):
        attrs, _ = t.__tensor_flatten__()
        for a in attrs:
            yield from storages_of(getattr(t, a))
        return
    if t.device.type == "meta":
        return
    try:
        s = t.untyped_storage()
    except (RuntimeError, NotImplementedError, TypeError):
        return
    if s.data_ptr() != 0 and s.nbytes() > 0:
        yield s


def _walk(obj: Any, key: Any = None, depth: int = 0, seen: set[int] | None = None) -> Iterator[tuple[Any, torch.Tensor]]:
    """``(key, tensor)`` for every tensor in nested dicts, lists and tuples (the key is the nearest dict key)."""
    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
        yield key, obj
        return
    if depth > 6 or id(obj) in seen:
        return
    if isinstance(obj, dict):
        seen.add(id(obj))
        for k, v in obj.items():
            if isinstance(k, torch.Tensor):  # a state dict keyed by parameter: the parameter is counted elsewhere
                k = None
            yield from _walk(v, k if k is not None else key, depth + 1, seen)
    elif isinstance(obj, (list, tuple, set, frozenset)):
        seen.add(id(obj))
        for v in obj:
            yield from _walk(v, key, depth + 1, seen)


def optimizer_tensors(opt: Any) -> Iterator[tuple[Any, torch.Tensor]]:
    """``(key, tensor)`` for the tensors of ``opt.state`` (a ``torch.optim.Optimizer``, or anything with a
    ``state`` mapping, or a chain with ``optimizers``); nothing for an object with neither."""
    seen: set[int] = set()
    for o in [opt, *(getattr(opt, "optimizers", None) or [])]:
        state = getattr(o, "state", None)
        if isinstance(state, dict):
            yield from _walk(state, seen=seen)


class LiveStorages(TorchDispatchMode):
    """The bytes of every live storage that an op made while the mode was on, or that :meth:`add` was given.

    ``total`` is the running sum; ``on_grow`` (if set) is called after an op that made it larger than
    ``peak``, and ``peak`` is the largest total seen.
    """

    def __init__(self) -> None:
        super().__init__()
        self._live: dict[int, list[Any]] = {}  # data_ptr -> [nbytes, token, saved for backward]
        self.total = 0
        self.peak = 0
        self.on_grow: Any = None

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for x in tree_leaves(out):
            if isinstance(x, torch.Tensor):
                self.add(x)
        if self.total > self.peak:
            self.peak = self.total
            if self.on_grow is not None:
                self.on_grow()
        return out

    def add(self, t: torch.Tensor) -> None:
        """Count ``t``'s storages until they are freed (once each)."""
        for s in storages_of(t):
            self.add_storage(s)

    def add_storage(self, s: torch.UntypedStorage) -> list[Any]:
        ptr, n = s.data_ptr(), s.nbytes()
        entry = self._live.get(ptr)
        if entry is not None:
            if entry[0] != n:  # resized in place
                self.total += n - entry[0]
                entry[0] = n
            return entry
        entry = [n, object(), False]
        self._live[ptr] = entry
        self.total += n
        fin = weakref.finalize(s, self._free, ptr, entry[1])
        fin.atexit = False  # nothing to count at exit
        return entry

    def _free(self, ptr: int, token: object) -> None:
        entry = self._live.get(ptr)
        if entry is not None and entry[1] is token:
            del self._live[ptr]
            self.total -= entry[0]

    def tracks(self, t: torch.Tensor) -> bool:
        """Whether every storage of ``t`` is counted now."""
        return all(s.data_ptr() in self._live for s in storages_of(t))

    def mark_saved(self, t: torch.Tensor) -> None:
        """``t`` was saved for backward: its storages are activations while they live."""
        for s in storages_of(t):
            self.add_storage(s)[2] = True

    def saved_bytes(self, exclude: set[int]) -> int:
        # a copy: a finalizer may run (and shrink the dict) at any allocation
        return sum(e[0] for ptr, e in list(self._live.items()) if e[2] and ptr not in exclude)

    @contextlib.contextmanager
    def saving(self) -> Iterator[None]:
        """Mark the tensors autograd saves for backward (``saved_tensors_hooks``; the pack hook keeps a
        detached alias, which holds the same storage and makes no reference cycle)."""
        def pack(t: torch.Tensor) -> torch.Tensor:
            self.mark_saved(t)
            return t.detach()

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield


@dataclass
class Breakdown:
    """The live bytes at one moment, by category (``total`` is their sum)."""

    weights: int = 0
    grads: int = 0
    state: int = 0
    activations: int = 0
    other: int = 0
    at: str = ""

    @property
    def total(self) -> int:
        return self.weights + self.grads + self.state + self.activations + self.other

    def to_dict(self) -> dict[str, int]:
        return {c: int(getattr(self, c)) for c in CATEGORIES}


class PeakRecorder:
    """The breakdown of :class:`LiveStorages` at its worst point, for one model and optimizer.

    ``phase`` names where the loop is (``"step 2, backward"``); :meth:`checkpoint` records the breakdown
    there whatever the total; the mode's growth records it when the total passes the worst one by more
    than ``threshold``.
    """

    def __init__(self, live: LiveStorages, model: nn.Module, opt: Any, *, threshold: float = 0.002) -> None:
        self.live, self.model, self.opt, self.threshold = live, model, opt, threshold
        self.params = [p for p in model.parameters()]
        self.phase = "start"
        self.worst = Breakdown()
        for t in self._tensors_before():
            live.add(t)
        live.on_grow = self._grew

    def _tensors_before(self) -> Iterable[torch.Tensor]:
        yield from self.params
        yield from (p.grad for p in self.params if p.grad is not None)
        yield from self.model.buffers()
        yield from (t for _, t in optimizer_tensors(self.opt))
        yield from (t for _, t in _walk(getattr(self.opt, "__dict__", {})))  # any tensor the optimizer keeps

    def _grew(self) -> None:
        if self.live.total > self.worst.total * (1 + self.threshold):
            self.checkpoint()

    def checkpoint(self, phase: str | None = None) -> Breakdown:
        """Record the breakdown now; it becomes the worst point if its total is the largest so far."""
        if phase is not None:
            self.phase = phase
        b = self.breakdown()
        if b.total > self.worst.total:
            self.worst = b
        return b

    def breakdown(self) -> Breakdown:
        seen: set[int] = set()

        def count(tensors: Iterable[torch.Tensor]) -> int:
            n = 0
            for t in tensors:
                for s in storages_of(t):
                    ptr = s.data_ptr()
                    if ptr not in seen:
                        seen.add(ptr)
                        self.live.add_storage(s)  # counted even if it was made out of the mode's sight
                        n += s.nbytes()
            return n

        state = list(optimizer_tensors(self.opt))
        weights = count([*self.params, *(t for k, t in state if k in WEIGHT_KEYS)])
        grads = count(p.grad for p in self.params if p.grad is not None)
        state_bytes = count(t for k, t in state if k not in WEIGHT_KEYS)
        activations = self.live.saved_bytes(seen)
        other = self.live.total - weights - grads - state_bytes - activations
        return Breakdown(weights, grads, state_bytes, activations, max(other, 0), self.phase)
