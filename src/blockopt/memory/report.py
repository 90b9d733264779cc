"""The table ``blockopt memory`` prints: one row per setup, bytes in MiB, peak RSS against a reference."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .tracker import CATEGORIES

__all__ = ["HEADER", "reference", "table"]

HEADER = ["setup", *(f"{c} MiB" for c in CATEGORIES), "bytes/param", "peak RSS MiB", "RSS vs {ref}"]
MIB = 1 << 20


def reference(records: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The record the RSS ratio is taken against: ``adamw`` when it was measured, else the first measured one."""
    ok = [r for r in records if r.get("peak_rss")]
    return next((r for r in ok if r["setup"] == "adamw"), ok[0] if ok else None)


def _mib(v: Any) -> str:
    if v is None:
        return "-"
    x = v / MIB
    return f"{x:.0f}" if x >= 1000 else f"{x:.1f}" if x >= 10 else f"{x:.2f}"


def table(records: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[str]], list[str]]:
    """``(header, rows, notes)``; a setup that could not run has dashes in its row and its error in ``notes``."""
    ref = reference(records)
    header = [h.format(ref=ref["setup"] if ref else "first") for h in HEADER]
    rows, notes = [], []
    for r in records:
        if r.get("error"):
            rows.append([r["setup"], *["-"] * (len(header) - 1)])
            notes.append(r["error"])
            continue
        ratio = "-"
        if ref is not None and r.get("peak_rss") is not None:
            ratio = f"{r['peak_rss'] / ref['peak_rss']:.2f}x"
        bpp = "-" if r.get("bytes_per_param") is None else f"{r['bytes_per_param']:.2f}"
        rows.append([r["setup"], *(_mib(r.get(c)) for c in CATEGORIES), bpp, _mib(r.get("peak_rss")), ratio])
    return header, rows, notes
