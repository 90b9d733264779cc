"""Memory bandwidth of this machine, as an optimizer step sees it.

Measures, on buffers much larger than the caches, with torch's own threads
(GB/s, median of repeats):

* ``copy``: ``dst.copy_(src)``, counted as 8 bytes per fp32 element, and
  ``add``: ``torch.add(a, b, out=c)``, 12 bytes. Both write to a destination
  they never read, which on x86 costs a hidden read of every written line
  (write-allocate), so they undercount what the memory system moves;
* ``scale_``: ``a.mul_(s)`` in place, 8 bytes, and ``add_``: ``a.add_(b)`` in
  place, 12 bytes: read-modify-write, the access pattern of an optimizer step,
  where every written line was just read (no hidden traffic).

The optimizer step bound uses the best of these: AdamW moves ~28 bytes per
fp32 parameter (p, g, m, v read; p, m, v written), Adam-mini ~20 (p, g, m
read; p, m written).

    python benchmarks/bandwidth.py [--device cuda] [--mib 1024]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

BYTES_PER_PARAM = {"adamw": 28, "adam-mini": 20}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure_bandwidth(device: str | torch.device = "cpu", mib: int = 512, repeats: int = 7) -> dict[str, float]:
    """GB/s for copy, add and the in-place scale_ / add_ on ``device`` (median of ``repeats``)."""
    device = torch.device(device)
    n = mib * 2**20 // 4
    a = torch.rand(n, device=device)
    b = torch.rand(n, device=device)
    c = torch.empty(n, device=device)
    out = {}
    for name, fn, nbytes in (
        ("copy", lambda: c.copy_(a), 8 * n),
        ("add", lambda: torch.add(a, b, out=c), 12 * n),
        ("scale_", lambda: c.mul_(1.0000001), 8 * n),
        ("add_", lambda: c.add_(b), 12 * n),
    ):
        fn()
        times = []
        for _ in range(repeats):
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times.append(time.perf_counter() - t0)
        out[name] = nbytes / statistics.median(times) / 1e9
    return out


def step_bound_ms(n_params: int, gbps: float, optimizer: str) -> float:
    return n_params * BYTES_PER_PARAM[optimizer] / (gbps * 1e9) * 1e3


def at_least_one(text: str) -> int:
    """argparse type for a count the timing scripts cannot take as 0 (rounds, steps, elements, matrices): an
    integer of at least 1; text that is not an integer is refused by argparse itself (the ValueError of int)."""
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be an integer of at least 1, got {n}")
    return n


def add_bandwidth_split(ap) -> None:
    """``--fast`` and ``--slow``: the GB/s thresholds of :func:`split_by_bandwidth` on an argparse parser."""
    ap.add_argument("--fast", type=float, default=75.0, help="GB/s: rounds where AdamW streamed at least this")
    ap.add_argument("--slow", type=float, default=65.0, help="GB/s: rounds where AdamW streamed less than this")


def split_by_bandwidth(ratios, gbps, fast: float, slow: float) -> tuple[float | None, int, float | None, int]:
    """Per-round ratios split by the bandwidth AdamW streamed in each round: the median ratio and the round
    count where it streamed at least ``fast`` GB/s, then where it streamed less than ``slow`` (None: no round).
    On a shared machine the bandwidth moves within seconds, and the ratios with it."""
    out = []
    for keep in (lambda b: b >= fast, lambda b: b < slow):
        sel = [r for r, b in zip(ratios, gbps) if keep(b)]
        out += [statistics.median(sel) if sel else None, len(sel)]
    return tuple(out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--mib", type=int, default=512, help="size of each buffer")
    args = ap.parse_args(argv)
    bw = measure_bandwidth(args.device, args.mib)
    print(f"device {args.device}, threads {torch.get_num_threads()}, buffers {args.mib} MiB")
    for k, v in bw.items():
        print(f"  {k:<6} {v:6.1f} GB/s")
    best = max(bw.values())
    for n in (20_586_240, 163_037_184):
        print(f"  {n / 1e6:.0f}M params: AdamW bound {step_bound_ms(n, best, 'adamw'):.1f} ms, "
              f"Adam-mini bound {step_bound_ms(n, best, 'adam-mini'):.1f} ms")


if __name__ == "__main__":
    main()
