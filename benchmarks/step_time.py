"""Optimizer step time on GPT-style models with random gradients.

Every implementation steps the same parameters with the same fixed random
gradients; implementations are timed in interleaved rounds (so a noisy
neighbour hurts all of them alike) and the median step is reported, with its
ratio to torch.optim.AdamW (foreach and fused) measured in the same run.

    python benchmarks/step_time.py                       # gpt2-20m and gpt2-160m on CPU
    python benchmarks/step_time.py --models gpt2-20m --rounds 5 --json out.json
    python benchmarks/step_time.py --impls adamw-fused,adam-mini,adam-mini-bf16,adam-mini-int8
    python benchmarks/step_time.py --models hf-gpt2-small --impls adamw-fused,adam-mini-foreach,adam-mini
    python benchmarks/step_time.py --device cuda --models llama-1b --impls adamw-fused,adamw-fused-graph,adam-mini,adam-mini-graph
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import time

import torch

import blockopt
from blockopt.models import build_model

sys.path.insert(0, __import__("os").path.dirname(__file__))
from bandwidth import BYTES_PER_PARAM, at_least_one, measure_bandwidth


def make_optimizers(model, which, lr=1e-4):
    cfg = model.config
    out = {}
    for name in which:
        if name == "adamw-foreach":
            out[name] = torch.optim.AdamW(model.parameters(), lr=lr, foreach=True)
        elif name == "adamw-fused":
            out[name] = torch.optim.AdamW(model.parameters(), lr=lr, fused=True)
        elif name == "adamw-single":
            out[name] = torch.optim.AdamW(model.parameters(), lr=lr, foreach=False)
        elif name == "adam-mini":  # AdamMini(model): SNR table, matrices factored, 0.55x state budget
            out[name] = blockopt.AdamMini(model, lr=lr)
        elif name == "adam-mini-rules-official":  # the official release's blocks, on our kernels
            out[name] = blockopt.AdamMini(model, lr=lr, rules="official")
        elif name == "adam-mini-rules-blocks":  # the default without factored matrices
            out[name] = blockopt.AdamMini(model, lr=lr, rules="blocks")
        elif name in ("adam-mini-bf16", "adam-mini-int8"):
            out[name] = blockopt.AdamMini(model, lr=lr, momentum_dtype=torch.bfloat16 if name.endswith("bf16") else "int8")
        elif name == "adam-mini-per-segment":  # CUDA: the Triton step with a launch per tensor segment
            out[name] = PerSegment(blockopt.AdamMini(model, lr=lr))
        elif name in ("adam-mini-snr", "adam-mini-snr-builtin"):
            # the SNR plan: rules by role from a calibration of the small model of the family
            # (benchmarks/results/snr/<family>-tiny.rules.json, from `blockopt calibrate`), or the built-in table
            out[name] = blockopt.AdamMini(model, lr=lr, plan=blockopt.partition(model, warn=False,
                                                                                 snr=snr_rules(model, name)))
        elif name == "adam-mini-foreach":
            out[name] = blockopt.AdamMini(model, lr=lr, fused=False)
        elif name in ("adam-mini-graph", "adamw-fused-graph"):  # CUDA only: the step replayed as a CUDA graph
            lr_t = torch.tensor(lr, device=next(model.parameters()).device)
            opt = (blockopt.AdamMini(model, lr=lr_t, capturable=True) if name == "adam-mini-graph"
                   else torch.optim.AdamW(model.parameters(), lr=lr_t, fused=True, capturable=True))
            out[name] = Graphed(opt)
        elif name == "adam-mini-reference":
            out[name] = blockopt.AdamMini(model, lr=lr, foreach=False)
        elif name == "adam-mini-official":
            try:
                from adam_mini import Adam_mini
            except ImportError:
                print("# adam-mini-official skipped: pip install 'blockopt[official]'", file=sys.stderr)
                continue
            out[name] = Adam_mini(model.named_parameters(), lr=lr, dim=cfg.d_model, n_heads=cfg.n_heads,
                                  n_kv_heads=cfg.kv_heads, verbose=False)
        else:
            raise SystemExit(f"unknown implementation {name!r}")
    return out


def snr_rules(model, name):
    """The rules of ``benchmarks/results/snr/<style>-tiny.rules.json`` for built-in models; ``"builtin"``
    for adam-mini-snr-builtin or other models."""
    import pathlib

    style = getattr(getattr(model, "config", None), "style", None)
    path = pathlib.Path(__file__).parent / "results" / "snr" / f"{style}-tiny.rules.json"
    if name == "adam-mini-snr-builtin" or style is None or not path.is_file():
        return "builtin"
    return blockopt.SNRRules.load(path)


class PerSegment:
    """AdamMini whose Triton step launches once per tensor segment (``multi_tensor=False``): what the
    table-driven multi-tensor launch of the default saves in host time."""

    def __init__(self, opt) -> None:
        self.opt = opt

    def step(self) -> None:
        import functools

        from blockopt.optim import adam_mini as module

        default = module.adam_mini_triton
        module.adam_mini_triton = functools.partial(default, multi_tensor=False)
        try:
            self.opt.step()
        finally:
            module.adam_mini_triton = default


class Graphed:
    """An optimizer whose ``step()`` replays a CUDA graph of one step (warmed up on a side stream)."""

    def __init__(self, opt, warmup: int = 3) -> None:
        self.opt = opt
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                opt.step()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            opt.step()

    def step(self) -> None:
        self.graph.replay()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_steps(opt, steps, device):
    sync(device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        opt.step()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def _model(name, device):
    """A built-in model, or ``hf-gpt2-small``: Hugging Face GPT-2 small (Conv1D weights stored [in, out],
    so column blocks), built from its config with transformers."""
    if name != "hf-gpt2-small":
        return build_model(name, device=device, seed=0)
    import transformers

    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config()).to(device)
    c = model.config
    model.config.d_model, model.config.n_heads, model.config.kv_heads = c.n_embd, c.n_head, c.n_head
    return model


def bench_model(name, impls, rounds, steps, warmup, device):
    model = _model(name, device)
    n_params = sum(p.numel() for p in model.parameters())
    g = torch.Generator(device=device).manual_seed(0)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g, device=device, dtype=p.dtype) * 1e-3
    opts = make_optimizers(model, impls)
    for opt in opts.values():
        for _ in range(warmup):
            opt.step()
    times = {k: [] for k in opts}
    for _ in range(rounds):
        for k, opt in opts.items():
            times[k] += time_steps(opt, steps, device)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    del opts, model
    gc.collect()
    return n_params, med


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="gpt2-20m,gpt2-160m")
    ap.add_argument("--impls", default="adamw-foreach,adamw-fused,adam-mini-official,adam-mini-rules-official,"
                                       "adam-mini-foreach,adam-mini")
    ap.add_argument("--rounds", type=at_least_one, default=5)
    ap.add_argument("--steps", type=at_least_one, default=3, help="timed steps per round and implementation")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    impls = [s for s in args.impls.split(",") if s]
    print(f"# torch {torch.__version__}, {platform.machine()}, device {device}, threads {torch.get_num_threads()}")
    print(f"# median of {args.rounds} rounds x {args.steps} steps, after {args.warmup} warm-up steps")
    bw = measure_bandwidth(device)
    gbps = max(bw.values())
    print("# bandwidth: " + ", ".join(f"{k} {v:.1f} GB/s" for k, v in bw.items()) + " (bound uses the best)")
    results = []
    for name in args.models.split(","):
        n, med = bench_model(name, impls, args.rounds, args.steps, args.warmup, device)
        base_f, base_u = med.get("adamw-foreach"), med.get("adamw-fused")
        print(f"\n{name}: {n / 1e6:.1f}M parameters")
        if base_u:  # the memory bandwidth this run actually had (it changes between runs on shared machines)
            print(f"  fused AdamW streamed {n * BYTES_PER_PARAM['adamw'] / (base_u / 1e3) / 1e9:.0f} GB/s")
        print(f"  {'implementation':<22}{'step ms':>10}{'/ foreach':>11}{'/ fused':>9}{'bound ms':>10}{'/ bound':>9}")
        bounds = {}
        for k, ms in med.items():
            rf = f"{ms / base_f:.2f}x" if base_f else "-"
            ru = f"{ms / base_u:.2f}x" if base_u else "-"
            bound = n * BYTES_PER_PARAM["adamw" if k.startswith("adamw") else "adam-mini"] / (gbps * 1e9) * 1e3
            bounds[k] = bound
            print(f"  {k:<22}{ms:>10.1f}{rf:>11}{ru:>9}{bound:>10.1f}{ms / bound:>8.2f}x")
        results.append({"model": name, "params": n, "median_ms": med, "bound_ms": bounds,
                        "adamw_fused_gbps": n * BYTES_PER_PARAM["adamw"] / (base_u / 1e3) / 1e9 if base_u else None})
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "device": str(device), "threads": torch.get_num_threads(),
                       "bandwidth_gbps": bw, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
