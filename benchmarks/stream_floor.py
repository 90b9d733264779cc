"""How close to its byte count a step can get: plain memory streams against fused AdamW, by bandwidth.

Adam-mini moves about 20 bytes per parameter (p, g and m read; p and m written) where AdamW moves 28,
so a step that only moved its bytes would take 0.71x of AdamW's time. This script times loops with
almost no arithmetic on 40M-element float32 arrays (both threads, each on its half):

- ``4r3w``: reads four arrays and writes three (AdamW's traffic, without its square root and division);
- ``3r2w``: reads three and writes two (Adam-mini's traffic), one pass;
- ``3r2w-halves``: the same, each thread stepping the two halves of its range together, 256
  elements of each in turn (twice the memory streams in flight, as the C++ kernel's row blocks and
  wide factored rows do).

Each round times fused ``torch.optim.AdamW`` and every loop once; the ratios to AdamW's time in the
same round are split by the bandwidth AdamW streamed in that round (28 bytes per element), because
on a shared machine the bandwidth moves within seconds. Needs a C++ compiler (the loops are built
like the library's kernel, about 10 s).

    python benchmarks/stream_floor.py                 # 200 rounds
    python benchmarks/stream_floor.py --rounds 400 --fast 75 --slow 65
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.optim.adamw import adamw
from torch.utils.cpp_extension import load

sys.path.insert(0, os.path.dirname(__file__))
from bandwidth import add_bandwidth_split, at_least_one, split_by_bandwidth

# as the library's kernel: at::parallel_for is only parallel when the extension is built with OpenMP
CFLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-fopenmp"]

SOURCE = r"""
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <algorithm>

namespace {
// kind 0: 4 reads, 3 writes; 1: 3 reads, 2 writes; 2: as 1, the two halves of each thread's range together
void run(const at::Tensor& P, const at::Tensor& G, const at::Tensor& M, const at::Tensor& V, int64_t kind) {
  float* __restrict p = P.data_ptr<float>();
  const float* __restrict g = G.data_ptr<float>();
  float* __restrict m = M.data_ptr<float>();
  float* __restrict v = V.data_ptr<float>();
  const int64_t n = P.numel();
  at::parallel_for(0, 2, 1, [&](int64_t b, int64_t e) {
    for (int64_t k = b; k < e; ++k) {
      const int64_t lo = n * k / 2, hi = n * (k + 1) / 2;
      if (kind == 0) {
#pragma omp simd
        for (int64_t i = lo; i < hi; ++i) {
          const float mm = 0.9f * m[i] + 0.1f * g[i];
          const float vv = 0.999f * v[i] + 0.001f * g[i] * g[i];
          m[i] = mm;
          v[i] = vv;
          p[i] = p[i] * 0.9999f - 1e-4f * mm * vv;
        }
      } else if (kind == 1) {
#pragma omp simd
        for (int64_t i = lo; i < hi; ++i) {
          const float mm = 0.9f * m[i] + 0.1f * g[i];
          m[i] = mm;
          p[i] = p[i] * 0.9999f - 1e-4f * mm;
        }
      } else {
        const int64_t h = (hi - lo) / 2;
        for (int64_t t = 0; t < hi - lo - h; t += 256) {
          for (int64_t a : {lo + t, lo + h + t}) {
            const int64_t end = std::min(a + 256, a == lo + t ? lo + h : hi);
#pragma omp simd
            for (int64_t i = a; i < end; ++i) {
              const float mm = 0.9f * m[i] + 0.1f * g[i];
              m[i] = mm;
              p[i] = p[i] * 0.9999f - 1e-4f * mm;
            }
          }
        }
      }
    }
  });
}
}  // namespace

TORCH_LIBRARY(blockopt_stream_floor, m) { m.def("run(Tensor p, Tensor g, Tensor m, Tensor v, int kind) -> ()"); }
TORCH_LIBRARY_IMPL(blockopt_stream_floor, CPU, m) { m.impl("run", run); }
"""

LOOPS = {"4r3w": 0, "3r2w": 1, "3r2w-halves": 2}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=at_least_one, default=200)
    ap.add_argument("--elements", type=at_least_one, default=40_000_000)
    add_bandwidth_split(ap)
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as build:
        src = Path(build) / "stream_floor.cpp"
        src.write_text(SOURCE)
        load(name="blockopt_stream_floor", sources=[str(src)], extra_cflags=CFLAGS,
             extra_ldflags=["-fopenmp"], is_python_module=False, build_directory=build, verbose=False)
    op = torch.ops.blockopt_stream_floor.run
    n = a.elements
    gen = torch.Generator().manual_seed(0)
    p, g, m, v = (torch.randn(n, generator=gen) * 1e-3 for _ in range(4))
    v.abs_()
    step = [torch.zeros(())]

    def fused_adamw():
        adamw([p], [g], [m], [v], [], step, fused=True, amsgrad=False, lr=1e-4, beta1=0.9, beta2=0.999,
              weight_decay=0.01, eps=1e-8, maximize=False)

    fns = {"adamw": fused_adamw, **{k: (lambda kind=kind: op(p, g, m, v, kind)) for k, kind in LOOPS.items()}}
    for f in fns.values():
        f()
    times = {k: [] for k in fns}
    for r in range(a.rounds):
        for k in list(fns) if r % 2 == 0 else list(fns)[::-1]:
            t = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t)
    gbps = [n * 28 / t / 1e9 for t in times["adamw"]]
    print(f"# {n / 1e6:.0f}M float32 elements, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{a.rounds} rounds; each loop's time over fused AdamW's in the same round, median")
    print(f"{'loop':<13}{'ms':>8}{'all rounds':>12}{f'>= {a.fast:g} GB/s':>18}{f'< {a.slow:g} GB/s':>18}")
    print(f"{'fused AdamW':<13}{statistics.median(times['adamw']) * 1e3:>8.1f}{'1.000x':>12}"
          f"{sum(b >= a.fast for b in gbps):>12} rounds{sum(b < a.slow for b in gbps):>12} rounds")
    for k in LOOPS:
        ratios = [t / w for t, w in zip(times[k], times["adamw"])]
        fast, _, slow, _ = split_by_bandwidth(ratios, gbps, a.fast, a.slow)
        cells = [f"{r:.3f}x" if r is not None else "-" for r in (fast, slow)]
        print(f"{k:<13}{statistics.median(times[k]) * 1e3:>8.1f}{statistics.median(ratios):>11.3f}x"
              f"{cells[0]:>18}{cells[1]:>18}")


if __name__ == "__main__":
    main()
