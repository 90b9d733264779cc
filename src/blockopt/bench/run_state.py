"""Where one bench run stands: the progress a checkpoint saves and ``--resume`` restores."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

__all__ = ["RunState"]


@dataclass
class RunState:
    """The mutable progress of one run (optimizer, lr, seed).

    Everything here is plain (numbers, lists of numbers, ``None``), so it travels in a
    checkpoint as JSON: :meth:`to_json` / :meth:`from_json`; :meth:`from_dict` also reads the
    ``"state"`` dict of checkpoints written before the JSON form (the same keys).
    """

    step: int = 0  # updates done
    train_time_s: float = 0.0  # forward, backward, optimizer step (the timed part)
    wall_time_s: float = 0.0  # every segment, evaluation and logging included
    eval_time_s: float = 0.0
    fwd_bwd: list[float] = field(default_factory=list)  # per-update seconds (the timers' samples)
    opt_step: list[float] = field(default_factory=list)
    diverged: bool = False
    diverged_step: int | None = None
    last_val: float | None = None
    best_val: float | None = None
    last_train: float | None = None
    resumed_from: int | None = None  # the step of the checkpoint this run continued from
    segments: int = 0  # processes that worked on this run (1 + resumes)
    peak_state_bytes: int = 0  # the optimizer state's bytes at their largest after any step (0: no step yet)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Any) -> RunState:
        """From :meth:`to_dict`'s form; raises ``ValueError`` or ``TypeError`` when ``d`` is not one."""
        if not isinstance(d, dict):
            raise TypeError(f"run state: expected a dict, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"run state: unknown fields {', '.join(map(str, unknown))}")
        st = cls(**d)
        st._check()
        return st

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: Any) -> RunState:
        if not isinstance(text, str):
            raise TypeError(f"run state: expected a JSON string, got {type(text).__name__}")
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"run state: not JSON ({e})") from None
        return cls.from_dict(d)

    def _check(self) -> None:
        def num(x: Any) -> bool:
            return isinstance(x, (int, float)) and not isinstance(x, bool)

        def opt_num(x: Any) -> bool:
            return x is None or num(x)

        ok = (isinstance(self.step, int) and not isinstance(self.step, bool) and self.step >= 0
              and all(num(getattr(self, k)) and math.isfinite(getattr(self, k))
                      for k in ("train_time_s", "wall_time_s", "eval_time_s"))
              and all(isinstance(getattr(self, k), list) and all(map(num, getattr(self, k)))
                      for k in ("fwd_bwd", "opt_step"))
              and isinstance(self.diverged, bool)
              and all(opt_num(getattr(self, k)) for k in ("diverged_step", "last_val", "best_val", "last_train",
                                                          "resumed_from"))
              and all(isinstance(getattr(self, k), int) and not isinstance(getattr(self, k), bool)
                      for k in ("segments", "peak_state_bytes")) and self.peak_state_bytes >= 0)
        if not ok:
            raise ValueError("run state: a field has the wrong type")
