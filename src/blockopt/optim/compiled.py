"""What ``torch.compile`` can and cannot capture of :meth:`blockopt.AdamMini.step`.

A function that calls ``opt.step()`` compiles to one graph (``fullgraph=True``) on the plain
(single-process) step, whatever the route: ``reference``, ``foreach`` and the fused CPU kernel
(``fused_cpu``, the custom op ``torch.ops.blockopt.adam_mini_step``). Under compile, per-element
blocks on the CPU take the C++ kernel instead of torch's fused AdamW (which torch does not let
Dynamo trace), and CUDA tensors take ``foreach`` instead of the Triton kernels.
The steps below are not captured whole: :func:`warn_if_not_compiled` says so once per reason,
from :meth:`~blockopt.AdamMini._init_group`, which Dynamo runs in Python while it traces.
"""

from __future__ import annotations

import warnings
from typing import Any

__all__ = ["not_compiled_reasons", "warn_if_not_compiled"]

_warned: set[str] = set()


def not_compiled_reasons(opt: Any, prepared: Any = None) -> list[tuple[str, str]]:
    """``(key, message)`` for each part of ``opt``'s step that ``torch.compile`` cannot capture whole;
    ``prepared``: a group's cached step lists (their routes and momentum codecs)."""
    out = []
    leave = "compile the model and leave opt.step() uncompiled"
    if opt._zero:
        out.append(("zero", f"the DeepSpeed ZeRO step (flat partitions, one all_reduce) is not traced; {leave}"))
    if opt._dtensors:
        out.append(("dtensor", "the FSDP2 (DTensor) step (shard layouts, one all_reduce) is not traced; " + leave))
    calib = opt._calib
    if calib is not None and calib.chosen is None:
        out.append(("calibrate", (f"calibrate={calib.window}: the calibration steps (the first {calib.window}) "
                                  "break the graph and recompile at every step until the switch to the SNR plan; run "
                                  "them uncompiled, or calibrate first (blockopt.calibrate) and pass plan=")))
    for handle, _, _ in prepared.handles if prepared is not None else ():
        if handle.codec is not None:
            out.append((f"codec-{handle.route}",
                        (f"the {handle.route} route with momentum_dtype={opt.momentum_format!r} seeds the stochastic "
                         "rounding of the compact momentum with the step counter read on the host (.item()), which "
                         "torch.compile captures only with fullgraph=True (or capture_scalar_outputs); otherwise the "
                         "step breaks there and recompiles at every step. On the CPU the fused route (fp32 "
                         "parameters, fused not False) stores compact momentum inside its kernel; or use "
                         "momentum_dtype=None")))
    return out


def warn_if_not_compiled(opt: Any, prepared: Any = None) -> None:
    """One ``UserWarning`` per reason of :func:`not_compiled_reasons` (once per process)."""
    for key, message in not_compiled_reasons(opt, prepared):
        if key not in _warned:
            _warned.add(key)
            warnings.warn(f"blockopt: torch.compile of AdamMini.step: {message}", UserWarning, stacklevel=3)
