"""``blockopt memory``: what one training step needs, measured, for several optimizer setups.

:func:`measure` runs each setup (see :mod:`blockopt.memory.setups`) in a process of its own, so that
its peak RSS is its own: the process builds the model (seed 0), runs a few real training steps on
random tokens and reports, at the worst point of the step (the largest sum of live tensor bytes),
how those bytes split into ``weights``, ``grads``, optimizer ``state``, ``activations`` (tensors saved
for backward) and ``other``, with ``bytes_per_param`` = (weights + grads + state) / parameters, and
``peak_rss``, the process's peak resident memory during the steps above its idle level after the
imports (``peak_rss_build``: the same while the model and optimizer were built). How the
live bytes are counted: :mod:`blockopt.memory.tracker`.

Example (a tiny model, one step; each setup takes a few seconds, most of it the child's imports)::

    >>> from blockopt.memory import measure
    >>> [r] = measure("llama-micro", "adamw", steps=1)
    >>> r["weights"] == 4 * r["params"]
    True
"""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from ..bench.errors import BenchInputError
from .child import RECORD_PREFIX, blank_record, measure_in_process
from .setups import ModelSource, Setup, parse_setups, resolve_model

__all__ = ["ALLOCATORS", "RECORD_KEYS", "check_inputs", "describe_model", "measure", "parse_setups"]

#: the keys of every record (``error`` too, when the setup could not run)
RECORD_KEYS = ("setup", "bytes_per_param", "weights", "grads", "state", "activations", "other", "peak_rss",
               "peak_rss_build", "params", "device", "at")


def _check(batch: int, seq: int, steps: int, device: str, src: ModelSource) -> None:
    for name, v in (("batch", batch), ("seq", seq), ("steps", steps)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise BenchInputError(f"--{name}: {v!r}; expected a positive integer")
    if src.max_len is not None and seq > src.max_len:
        raise BenchInputError(f"--seq: {seq} exceeds the model's {src.max_len} positions")
    kind = device.split(":")[0]
    if kind not in ("cpu", "cuda"):
        raise BenchInputError(f"--device: {device!r}; expected cpu or cuda")
    if kind == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise BenchInputError(f"--device {device}: torch {torch.__version__} sees no CUDA device here")


def _module_source(model: nn.Module) -> ModelSource:
    """What :mod:`blockopt.memory.setups` needs to know of a model given as a module."""
    from ..models import TransformerLM

    if isinstance(model, TransformerLM):
        c = model.config
        return ModelSource("<module>", False, c.d_model, c.n_heads, c.kv_heads, c.vocab_size, c.max_seq_len)
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(cfg, "vocab_size"):
        raise BenchInputError(f"model: a {type(model).__name__} is neither a blockopt built-in model nor a "
                              "transformers causal LM (with .config.vocab_size); pass a preset name or a config path")
    from ..bench.hf import hf_attention_shape, hf_max_positions

    hidden, heads, kv = hf_attention_shape(cfg)
    return ModelSource("<module>", True, hidden, heads, kv, int(cfg.vocab_size), hf_max_positions(cfg))


def check_inputs(model: str | nn.Module, setups: str | Sequence[str], *, batch: int = 1, seq: int = 64,
                 steps: int = 3, device: str = "cpu") -> tuple[list[Setup], ModelSource]:
    """The arguments of :func:`measure`, checked (:class:`~blockopt.bench.errors.BenchInputError` naming the
    command-line argument): the setups and the model they will run on."""
    parsed = parse_setups(setups)
    src = _module_source(model) if isinstance(model, nn.Module) else resolve_model(str(model))
    _check(batch, seq, steps, device, src)
    return parsed, src


def describe_model(model: str) -> dict[str, Any]:
    """The model built on the meta device (nothing allocated): its parameter count, and the optimizer state
    of fp32 AdamW and of ``AdamMini(model)``'s plan (``None`` if the plan cannot be made)."""
    src = resolve_model(model)
    meta = src.build("meta", seed=None)
    info: dict[str, Any] = {"model": model, "params": sum(p.numel() for p in meta.parameters()),
                            "adamw_state_bytes": None, "adam_mini_state_bytes": None,
                            "adam_mini_int8_state_bytes": None}
    try:
        from ..optim import AdamMini

        plan = AdamMini(meta).plan
    except Exception:  # noqa: BLE001 - the summary is a courtesy; the measured run reports the real state
        return info
    info.update(adamw_state_bytes=plan.adamw_state_bytes(), adam_mini_state_bytes=plan.state_bytes(),
                adam_mini_int8_state_bytes=plan.state_bytes(momentum_dtype="int8"))
    return info


#: ``allocator=``: how the measuring process's C heap is set up (glibc). ``"mmap"``: every allocation
#: above 128 KiB is mapped on its own and unmapped when freed, so the RSS follows the live tensors;
#: ``"heap"``: glibc's default, whose mmap threshold grows with the tensors freed, after which freed
#: tensors may stay in the heap (resident) and fragment it.
ALLOCATORS = {"mmap": {"MALLOC_MMAP_THRESHOLD_": "131072"}, "heap": {}}


def _child(setup: Setup, model: str, *, batch: int, seq: int, steps: int, device: str,
           allocator: str = "mmap") -> dict[str, Any]:
    spec = json.dumps({"setup": setup.text, "model": model, "batch": batch, "seq": seq, "steps": steps,
                       "device": device})
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    env.update(ALLOCATORS[allocator])
    here = str(Path(__file__).resolve().parents[2])  # the folder that holds this blockopt
    env["PYTHONPATH"] = here + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    done = subprocess.run([sys.executable, "-m", "blockopt.memory", spec], capture_output=True, text=True,
                          env=env, check=False)
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(RECORD_PREFIX):
            return {**json.loads(line[len(RECORD_PREFIX):]), "allocator": allocator}
    rc = done.returncode
    how = f"exit status {rc}"
    if rc < 0:
        how = f"killed by {signal.Signals(-rc).name}" + (" (out of memory?)" if -rc == signal.SIGKILL else "")
    tail = [x.strip() for x in done.stderr.strip().splitlines() if x.strip()]
    why = f"{how}: {tail[-1]}" if tail else how
    return blank_record(setup.text, params=None, device=device, error=f"{setup.text}: the measuring process failed, "
                        f"{why}")


def measure(model: str | nn.Module, setups: str | Sequence[str], *, batch: int = 1, seq: int = 64,
            steps: int = 3, device: str = "cpu", allocator: str = "mmap",
            on_record: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """Measure what ``steps`` training steps of ``model`` need with each of ``setups``; one record per setup.

    ``model`` is a built-in preset name (:data:`blockopt.models.MODEL_PRESETS`) or a transformers
    ``config.json`` / folder / inline JSON; each setup then runs in a fresh ``python -m blockopt.memory``
    process. An ``nn.Module`` (a built-in model or a transformers causal LM) is measured in this process
    instead, each setup on a deep copy, and its records have ``peak_rss`` ``None``.

    ``setups``: a comma-separated string or a list (``"adamw,adam-mini:momentum=int8,lean"``). Bad names,
    options or sizes raise :class:`~blockopt.bench.errors.BenchInputError` before anything runs; a setup
    that cannot run (a missing package, an error on this device) gives a record with ``error`` and null
    figures. Bytes are ints; ``at`` names the phase of the worst point. ``on_record`` is called with each
    record as it is made. ``allocator``: the C heap of each setup's process, :data:`ALLOCATORS` (recorded
    as ``allocator``).
    """
    if allocator not in ALLOCATORS:
        raise BenchInputError(f"--allocator: {allocator!r}; expected one of {', '.join(ALLOCATORS)}")
    parsed, src = check_inputs(model, setups, batch=batch, seq=seq, steps=steps, device=device)
    in_process = isinstance(model, nn.Module)
    records = []
    for setup in parsed:
        if (why := setup.missing()) is not None:
            rec = blank_record(setup.text, params=None, device=device, error=why)
        elif in_process:
            rec = measure_in_process(setup, src, batch=batch, seq=seq, steps=steps, device=device,
                                     model=copy.deepcopy(model))
        else:
            rec = _child(setup, str(model), batch=batch, seq=seq, steps=steps, device=device, allocator=allocator)
        records.append(rec)
        if on_record is not None:
            on_record(rec)
    return records
