"""One setup's measured run, in a process of its own (``python -m blockopt.memory '<json>'``).

The child imports what the setup needs, records its idle RSS, builds the model (seed 0), runs the
training steps under :class:`~blockopt.memory.tracker.LiveStorages` (CPU) or CUDA's allocator
statistics, and prints its record as the last line of stdout.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import json
import resource
import sys
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .setups import ModelSource, Setup, SetupUnavailable, build_optimizer, first_line, parse_setups, resolve_model
from .tracker import CATEGORIES, Breakdown, LiveStorages, PeakRecorder, optimizer_tensors, storages_of

__all__ = ["RECORD_PREFIX", "blank_record", "current_rss", "main", "measure_in_process", "peak_rss"]

#: the child's record line starts with this, so that nothing else on stdout is taken for it
RECORD_PREFIX = "blockopt-memory-record "


def blank_record(setup: str, *, params: int | None, device: str, error: str | None = None) -> dict[str, Any]:
    """A record with null figures (and ``error`` when given)."""
    rec: dict[str, Any] = {"setup": setup, "bytes_per_param": None, **dict.fromkeys(CATEGORIES),
                           "peak_rss": None, "peak_rss_build": None, "params": params, "device": device, "at": None}
    if error is not None:
        rec["error"] = error
    return rec


def _status_bytes(key: str) -> int | None:
    """A ``kB`` figure of ``/proc/self/status`` (``VmRSS``, ``VmHWM``) in bytes, or ``None`` where there is none."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def current_rss() -> int | None:
    """This process's resident set now, in bytes (``/proc/self/status``), or ``None`` where there is none."""
    return _status_bytes("VmRSS")


def peak_rss() -> int:
    """The largest resident set of this process since the start or the last :func:`reset_peak_rss`, in
    bytes (``VmHWM`` in ``/proc/self/status``; else ``ru_maxrss``, KiB on Linux, bytes on macOS)."""
    hwm = _status_bytes("VmHWM")
    if hwm is not None:
        return hwm
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r) if sys.platform == "darwin" else int(r) * 1024


def _trim_heap() -> None:
    """Return the C heap's free memory to the OS (glibc ``malloc_trim``; nothing elsewhere)."""
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def reset_peak_rss() -> bool:
    """Start the high-water mark again from the current resident set (Linux: ``5`` to
    ``/proc/self/clear_refs``); ``False`` where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _prepare(setup: Setup, src: ModelSource, device: str) -> None:
    """Import what the setup will use, so that the idle RSS includes it (:class:`SetupUnavailable` if it cannot)."""
    if (why := setup.missing()) is not None:
        raise SetupUnavailable(why)
    if setup.package is not None:
        try:
            importlib.import_module(setup.package[0])
        except Exception as e:  # noqa: BLE001 - a broken optional package, whatever it raises
            raise SetupUnavailable(f"{setup.text}: the package {setup.package[1]!r} does not import: "
                                   f"{first_line(e)}") from None
    if src.hf:  # transformers imports a model's code on first use: build it once on meta
        src.build("meta", seed=None)
    if device.startswith("cuda"):  # the CUDA context is part of the idle process, not of the step
        torch.empty(1, device=device)
    if setup.name == "adam-mini" and device == "cpu":
        with contextlib.suppress(Exception):  # the fused kernel is loaded (or built) by the first step otherwise
            from ..kernels.adam_mini_cpu import load_cpu_kernel

            load_cpu_kernel()


def _tokens(src: ModelSource, batch: int, seq: int, steps: int, device: str) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, src.vocab_size, (batch, seq + 1), generator=g).to(device) for _ in range(steps)]


def _autocast(setup: Setup, device: str) -> Any:
    return torch.autocast(device, dtype=torch.bfloat16) if setup.autocast else contextlib.nullcontext()


def _run_cpu(setup: Setup, src: ModelSource, model: nn.Module, opt: Any, tokens: list[torch.Tensor]) -> Breakdown:
    live = LiveStorages()
    rec = PeakRecorder(live, model, opt)
    with live, live.saving():
        for i, x in enumerate(tokens, 1):
            live.add(x)
            rec.phase = f"step {i}, forward"
            with _autocast(setup, "cpu"):
                loss = src.loss(model, x)
            rec.checkpoint()
            rec.phase = f"step {i}, backward"
            loss.backward()
            rec.checkpoint()
            rec.phase = f"step {i}, optimizer step"
            opt.step()
            rec.checkpoint()
            rec.phase = f"step {i}, zero_grad"
            opt.zero_grad(set_to_none=True)
            del loss
    return rec.worst


def _bytes(tensors: Any) -> tuple[int, set[int]]:
    seen: set[int] = set()
    n = 0
    for t in tensors:
        for s in storages_of(t):
            if s.data_ptr() not in seen:
                seen.add(s.data_ptr())
                n += s.nbytes()
    return n, seen


def _run_cuda(setup: Setup, src: ModelSource, model: nn.Module, opt: Any, tokens: list[torch.Tensor]) -> Breakdown:
    """Best effort: the peak from ``torch.cuda.max_memory_allocated()``; weights, grads and state the largest
    seen after backward and after the step; activations the tensors saved for backward at the end of
    the forward; other the rest of the peak."""
    params = list(model.parameters())
    worst = {c: 0 for c in CATEGORIES}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        for s in storages_of(t):
            saved[s.data_ptr()] = s.nbytes()
        return t.detach()

    def split(activations: bool) -> None:
        state = list(optimizer_tensors(opt))
        w, seen = _bytes([*params, *(t for k, t in state if k == "weight_remainder")])
        g, seen_g = _bytes(p.grad for p in params if p.grad is not None)
        s, seen_s = _bytes(t for k, t in state if k != "weight_remainder")
        for c, v in (("weights", w), ("grads", g), ("state", s)):
            worst[c] = max(worst[c], v)
        if activations:
            skip = seen | seen_g | seen_s
            worst["activations"] = max(worst["activations"], sum(n for p, n in saved.items() if p not in skip))

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        for x in tokens:
            saved.clear()
            with _autocast(setup, "cuda"):
                loss = src.loss(model, x)
            split(activations=True)
            loss.backward()
            split(activations=False)
            opt.step()
            split(activations=False)
            opt.zero_grad(set_to_none=True)
            del loss
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    known = sum(worst[c] for c in CATEGORIES if c != "other")
    return Breakdown(worst["weights"], worst["grads"], worst["state"], worst["activations"], max(peak - known, 0),
                     "cuda peak")


def run_setup(setup: Setup, src: ModelSource, *, batch: int, seq: int, steps: int, device: str,
              model: nn.Module | None = None, idle_rss: int | None = None) -> dict[str, Any]:
    """Build the model (unless given) and the optimizer, run ``steps`` steps, and return the record."""
    try:
        if model is None:
            model = src.build(device, seed=0)
        model.train()
        n = sum(p.numel() for p in model.parameters())
        opt, _handle = build_optimizer(setup, model, src)
        tokens = _tokens(src, batch, seq, steps, device)
        # the peak RSS of the steps: the building's (an fp32 model before compact weights) is its own figure
        built = peak_rss() - idle_rss if idle_rss is not None else None
        _trim_heap()  # memory the build freed (an fp32 model before compact weights) goes back to the OS
        windowed = idle_rss is not None and reset_peak_rss()
        run = _run_cuda if device.startswith("cuda") else _run_cpu
        b = run(setup, src, model, opt, tokens)
    except SetupUnavailable as e:
        return blank_record(setup.text, params=None, device=device, error=str(e))
    except Exception as e:  # noqa: BLE001 - a setup that fails on this device is a record, not a crash
        return blank_record(setup.text, params=None, device=device,
                            error=f"{setup.text} failed on {device}: {first_line(e)}")
    rec = blank_record(setup.text, params=n, device=device)
    rec.update(b.to_dict())
    rec["bytes_per_param"] = round((b.weights + b.grads + b.state) / max(n, 1), 3)
    rec["at"] = b.at
    if idle_rss is not None:
        rec["peak_rss"] = max(peak_rss() - idle_rss, 0)
        rec["peak_rss_build"] = max(built, 0) if windowed else None
    return rec


def measure_in_process(setup: Setup, src: ModelSource, **kw: Any) -> dict[str, Any]:
    """:func:`run_setup` after the imports it needs (the record's ``error`` if they fail)."""
    try:
        _prepare(setup, src, kw["device"])
    except SetupUnavailable as e:
        return blank_record(setup.text, params=None, device=kw["device"], error=str(e))
    return run_setup(setup, src, **kw)


def main(argv: Sequence[str]) -> int:
    """The child: ``argv[0]`` is a JSON object with ``setup``, ``model``, ``batch``, ``seq``, ``steps`` and
    ``device``; the record is printed on the last line of stdout after :data:`RECORD_PREFIX`."""
    spec = json.loads(argv[0])
    setup = parse_setups(spec["setup"])[0]
    src = resolve_model(spec["model"])
    device = spec["device"]
    try:
        _prepare(setup, src, device)
    except SetupUnavailable as e:
        rec = blank_record(setup.text, params=None, device=device, error=str(e))
    else:
        idle = current_rss()
        if idle is None:  # no /proc: the high-water mark so far is the closest to idle there is
            idle = peak_rss()
        rec = run_setup(setup, src, batch=spec["batch"], seq=spec["seq"], steps=spec["steps"], device=device,
                        idle_rss=idle)
    print(RECORD_PREFIX + json.dumps(rec), flush=True)
    return 0
