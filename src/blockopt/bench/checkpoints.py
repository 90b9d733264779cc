"""A bench run's ``checkpoint.pt``: what it holds, how it is written and read back.

Format 2 (this version) is one ``torch.save`` of a dict that holds only tensors, plain
containers, numbers and strings, so it loads with ``torch.load(path, weights_only=True)``
(which runs no pickled code)::

    {"format": 2,
     "model": model.state_dict(),          # tensors
     "optimizer": optimizer.state_dict(),  # tensors, numbers, strings (Adam-mini's plan: JSON strings)
     "run_state": "<json>",                # RunState.to_json(): step, times, losses, ...
     "rng": {"cpu": ByteTensor, "cuda": ByteTensor (CUDA runs)}}

Format 1 (earlier versions: no ``"format"``, the run state as a dict under ``"state"``) is
read too, also with ``weights_only=True``: its contents were plain as well. A file that does
not load that way (it holds pickled objects, or is damaged) is refused with
:class:`CheckpointError`, which names the file; it is never loaded with ``weights_only=False``.
"""

from __future__ import annotations

import json
import pickle
from collections import Counter, OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..utils import atomic_write, atomic_write_text
from .errors import BenchInputError
from .run_state import RunState

__all__ = [
    "CHECKPOINT_FORMAT",
    "Checkpoint",
    "CheckpointError",
    "atomic_torch_save",
    "get_rng",
    "load_checkpoint",
    "make_checkpoint",
    "set_rng",
    "truncate_metrics",
    "unsafe_objects",
]

CHECKPOINT_FORMAT = 2


class CheckpointError(BenchInputError):
    """A run checkpoint that cannot be resumed from (the message names the file and what to do)."""


@dataclass
class Checkpoint:
    """A checkpoint as read back: state dicts, the run's progress and the RNG states."""

    model: dict[str, Any]
    optimizer: dict[str, Any]
    state: RunState
    rng: dict[str, torch.Tensor] | None
    format: int


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save(obj)`` to ``path`` through a temporary file and ``os.replace``: never half-written."""
    atomic_write(path, lambda f: torch.save(obj, f))


# --- what weights_only loading accepts ------------------------------------------------------
_PLAIN_LEAVES = (str, bytes, bytearray, int, float, bool, complex, type(None), torch.dtype, torch.device)
_PLAIN_CONTAINERS = (dict, OrderedDict, Counter, list, tuple, set, torch.Size)


def unsafe_objects(obj: Any, where: str = "", out: list[str] | None = None, limit: int = 5) -> list[str]:
    """Where ``obj`` holds something ``torch.load(weights_only=True)`` would refuse (a custom
    class, a tensor subclass, a function): ``["optimizer.state.3.foo: MyClass", ...]`` (at most
    ``limit``); empty when every leaf is a plain tensor, number, string or ``None``."""
    out = [] if out is None else out
    if len(out) >= limit:
        return out
    t = type(obj)
    if t in (torch.Tensor, torch.nn.Parameter) or t in _PLAIN_LEAVES:
        return out
    if t in _PLAIN_CONTAINERS:
        items = obj.items() if isinstance(obj, dict) else enumerate(obj)
        for k, v in items:
            if isinstance(obj, dict):
                unsafe_objects(k, f"{where}[key {k!r}]", out, limit)
            unsafe_objects(v, f"{where}.{k}" if where else str(k), out, limit)
        return out
    out.append(f"{where or '(top)'}: {t.__module__}.{t.__qualname__}")
    return out


def make_checkpoint(model_state: dict[str, Any], optimizer_state: dict[str, Any], state: RunState,
                    rng: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The dict :func:`atomic_torch_save` writes (format :data:`CHECKPOINT_FORMAT`)."""
    return {"format": CHECKPOINT_FORMAT, "model": model_state, "optimizer": optimizer_state,
            "run_state": state.to_json(), "rng": rng}


def _refuse(path: Path, why: str) -> CheckpointError:
    return CheckpointError(f"--resume: the checkpoint {str(path)!r} {why}; delete it to restart this run from "
                           f"step 0 (the rest of the sweep is kept)")


def load_checkpoint(path: str | Path, device: torch.device | str) -> Checkpoint:
    """Read ``checkpoint.pt`` with ``weights_only=True`` (format 2, or format 1 of earlier versions);
    raises :class:`CheckpointError` (naming the file) for anything else."""
    path = Path(path)
    try:
        ck = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as e:
        try:
            bad = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception:  # noqa: BLE001 - not even a readable torch archive
            bad = []
        if bad:
            raise _refuse(path, f"holds pickled objects ({', '.join(bad[:5])}) that would run code when loaded; "
                                "it is not loaded with weights_only=False") from None
        raise _refuse(path, f"is not readable with torch.load(weights_only=True) ({_first_line(e)})") from None
    except Exception as e:  # noqa: BLE001 - a damaged or truncated file
        raise _refuse(path, f"is unreadable ({type(e).__name__}: {_first_line(e)})") from None
    if not isinstance(ck, dict) or not {"model", "optimizer"} <= set(ck):
        raise _refuse(path, "is not a blockopt bench checkpoint (no 'model' and 'optimizer' entries)")
    fmt = ck.get("format", 1)
    if (fmt == 1 and "format" in ck) or fmt not in (1, CHECKPOINT_FORMAT):
        raise _refuse(path, f"has format {fmt!r}; this version reads formats 1 and {CHECKPOINT_FORMAT}")
    try:
        if fmt == CHECKPOINT_FORMAT:
            state = RunState.from_json(ck.get("run_state"))
        else:  # format 1: the same fields, as a dict
            state = RunState.from_dict(ck.get("state"))
    except (ValueError, TypeError) as e:
        raise _refuse(path, f"has a bad run state ({e})") from None
    rng = ck.get("rng")
    if rng is not None and not (isinstance(rng, dict) and all(isinstance(v, torch.Tensor) for v in rng.values())):
        raise _refuse(path, "has a bad 'rng' entry (expected tensors)")
    return Checkpoint(ck["model"], ck["optimizer"], state, rng, fmt)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# --- resume helpers -------------------------------------------------------------------------
def get_rng(device: torch.device) -> dict[str, torch.Tensor]:
    """The RNG states a run checkpoints (ByteTensors): CPU, and the run's CUDA device if any."""
    rng = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)
    return rng


def set_rng(rng: dict[str, torch.Tensor] | None, device: torch.device) -> None:
    if not rng:
        return
    torch.set_rng_state(rng["cpu"].cpu())
    if device.type == "cuda" and "cuda" in rng:
        torch.cuda.set_rng_state(rng["cuda"].cpu(), device)


def truncate_metrics(path: Path, step: int) -> None:
    """Drop logged lines past the checkpoint (they will be logged again)."""
    if not path.exists():
        return
    keep = []
    for ln in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(ln)
        except json.JSONDecodeError:
            continue  # a line cut by the interruption
        if rec.get("step", 0) <= step:
            keep.append(ln)
    atomic_write_text(path, "".join(k + "\n" for k in keep))
