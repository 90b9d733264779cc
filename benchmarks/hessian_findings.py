"""The two Hessian findings behind Adam-mini, reproduced on the built-in tiny models.

1. Block heterogeneity (Zhang et al. 2024): at initialisation the Transformer's weight blocks
   have Hessian spectra that differ far more from block to block than the CNN's or the MLP's.
   Measured with ``blockopt.hessian.heterogeneity`` (default settings: curvature-weighted
   densities on a symmetric log axis, SLQ with 4 probes x 40 steps and 8 deflated eigenpairs per
   block) for several seeds (model initialisation, batch and probes all change), next to each
   run's noise floor; plus the ResNet-style CNN with batch norm, which the report discusses.
2. Near block-diagonal structure (Adam-mini s. 2, Dong et al. 2025): the dense Hessian of a query
   (and key) weight keeps almost all its mass inside the per-head blocks. Because a single
   tensor's per-tensor score is 1 by definition and any coarser partition scores higher, per head
   is compared with partitions of the *same* number and sizes of blocks -- random ones, and
   groups of input features -- and with the finer per-row partition.

It also checks the estimator: on the Transformer's attention blocks (1024 entries each, cheap to
diagonalise) the SLQ heterogeneity is compared with the one from the exact spectra, for the
curvature-weighted density (the default) and the plain count density. And it shows how the
three models' ordering moves with the grid settings (weighting, floor, smoothing), computed from
the same quadratures.

    python benchmarks/hessian_findings.py                  # ~5 min on 2 busy cores
    python benchmarks/hessian_findings.py --seeds 0 --out /tmp/h    # one seed, ~2 min

Writes ``results.json`` and PNG plots to ``--out`` (default ``benchmarks/results/hessian``).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

import blockopt
from blockopt.hessian import (
    HessianOperator,
    SpectralQuadrature,
    common_grid,
    compare_partitions,
    dense_hessian,
    heterogeneity,
    js_matrix,
    plot_heatmap,
    plot_js_matrix,
    plot_spectra,
    standard_partitions,
)
from blockopt.hessian.heterogeneity import mean_offdiagonal
from blockopt.hessian.models import TinyCNN, build_problem

MODELS = ("tiny-transformer", "tiny-cnn", "tiny-mlp", "tiny-cnn-bn")


def problem(name: str, seed: int):
    if name != "tiny-cnn-bn":
        return build_problem(name, seed=seed)
    pb = build_problem("tiny-cnn", seed=seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        pb.model = TinyCNN(pb.info["image_shape"][0], pb.info["classes"], batch_norm=True)
    pb.name = name
    return pb


def log(msg: str) -> None:
    print(f"# {msg}", file=sys.stderr, flush=True)


def sensitivity(quads: list[SpectralQuadrature]) -> dict[str, float]:
    out = {}
    for weighting in ("curvature", "count"):
        for floor_rel in (1e-2, 1e-3, 1e-4):
            for sigma in (0.1, 0.25, 0.5):
                g = common_grid(quads, sigma=sigma, floor_rel=floor_rel)
                d = torch.stack([q.density(g, weighting) for q in quads])
                out[f"{weighting}/floor{floor_rel:g}/sigma{sigma:g}"] = mean_offdiagonal(js_matrix(d))
    return out


def exact_check(seed: int) -> dict:
    """SLQ vs exact spectra on the Transformer's attention blocks (8 x 1024 entries)."""
    pb = build_problem("tiny-transformer", seed=seed)
    names = [f"blocks.{i}.attn.{p}_proj.weight" for i in range(2) for p in "qkvo"]
    op = HessianOperator(pb.model, pb.batch, pb.loss_fn, params=names)
    res = heterogeneity(op)
    exact = []
    for n in names:
        e = torch.linalg.eigvalsh(dense_hessian(op, n, symmetrize=True))
        exact.append(SpectralQuadrature([e], [torch.full_like(e, 1 / e.numel())], e.numel()))
    out = {"blocks": names}
    for weighting in ("curvature", "count"):
        est = torch.stack([q.density(res.grid, weighting) for q in res.quadratures])
        dens = torch.stack([q.density(res.grid, weighting) for q in exact])
        out[weighting] = {"slq": mean_offdiagonal(js_matrix(est)), "exact": mean_offdiagonal(js_matrix(dens))}
    return out


def dense_findings(seed: int, out_dir: Path | None) -> list[dict]:
    rows = []
    pb = build_problem("tiny-transformer", seed=seed)
    plan = blockopt.partition(pb.model, warn=False)
    names = ["blocks.0.attn.q_proj.weight", "blocks.1.attn.q_proj.weight", "blocks.0.attn.k_proj.weight"]
    op = HessianOperator(pb.model, pb.batch, pb.loss_fn, params=names)
    for n in names:
        H = dense_hessian(op, n, symmetrize=True)
        parts = standard_partitions(op.shapes[op.names.index(n)], plan[n])
        scores = compare_partitions(H, parts, seed=seed, trials=16)
        rows.append({"model": "tiny-transformer", "param": n, "seed": seed, "plan": plan[n].describe(),
                     "partitions": [s.to_dict() for s in scores]})
        if out_dir is not None and n == names[0]:
            plot_heatmap(H, out_dir / "query_hessian.png", labels=parts["plan"], dpi=90,
                         title=f"tiny-transformer {n} at initialisation\nlines: the plan's blocks (4 heads)")
    # the MLP's hidden layer: per output neuron (the plan) against random partitions of the same sizes
    pb = build_problem("tiny-mlp", seed=seed)
    plan = blockopt.partition(pb.model, warn=False)
    op = HessianOperator(pb.model, pb.batch, pb.loss_fn, params=["fc3.weight"])
    H = dense_hessian(op, "fc3.weight", symmetrize=True)
    parts = standard_partitions(op.shapes[0], plan["fc3.weight"])
    rows.append({"model": "tiny-mlp", "param": "fc3.weight", "seed": seed, "plan": plan["fc3.weight"].describe(),
                 "partitions": [s.to_dict() for s in compare_partitions(H, parts, seed=seed, trials=16)]})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", default="0,1,2", help="comma separated (default 0,1,2)")
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma separated from {', '.join(MODELS)}")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "hessian"))
    ap.add_argument("--no-exact", action="store_true", help="skip the SLQ-vs-exact check (~1 min)")
    ap.add_argument("--docs", default=str(Path(__file__).parent.parent / "docs" / "findings"),
                    help="where the two plots of docs/findings.md are copied ('' for nowhere)")
    args = ap.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    models = [m for m in args.models.split(",") if m.strip()]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)  # many tiny products: one thread is fastest and robust to busy cores
    torch.set_flush_denormal(True)  # float32 products of small curvatures: denormals are ~100x slower
    t0 = time.perf_counter()

    results: dict = {"heterogeneity": {}, "sensitivity": {}, "dense": [], "exact_check": None}
    first: dict = {}
    for name in models:
        runs = []
        for seed in seeds:
            t = time.perf_counter()
            pb = problem(name, seed)
            op = HessianOperator(pb.model, pb.batch, pb.loss_fn, seed=seed)
            res = heterogeneity(op, seed=seed)
            runs.append({"seed": seed, "heterogeneity": res.heterogeneity, "noise_floor": res.noise_floor,
                         "blocks": len(res.blocks), "matvecs": res.matvecs, "seconds": time.perf_counter() - t,
                         "top_eigenvalues": {b: v["top_eigenvalues"] for b, v in res.top.items()}})
            log(f"{name} seed {seed}: heterogeneity {res.heterogeneity:.3f} (noise floor {res.noise_floor:.3f}), "
                f"{res.matvecs} products, {time.perf_counter() - t:.1f} s")
            if seed == seeds[0]:
                first[name] = res
                results["sensitivity"][name] = sensitivity(res.quadratures)
        vals = [r["heterogeneity"] for r in runs]
        results["heterogeneity"][name] = {
            "mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
            "noise_floor_mean": statistics.fmean(r["noise_floor"] for r in runs), "runs": runs,
        }

    log("dense Hessians")
    for seed in seeds:
        results["dense"] += dense_findings(seed, out if seed == seeds[0] else None)
    if not args.no_exact:
        log("SLQ vs exact spectra")
        results["exact_check"] = exact_check(seeds[0])

    # plots
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h = results["heterogeneity"]
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=110)
    xs = list(h)
    ax.bar(xs, [h[m]["mean"] for m in xs], yerr=[h[m]["std"] for m in xs], color=["C3", "C0", "C2", "C7"][:len(xs)],
           capsize=4, label=f"heterogeneity (mean +- std over seeds {args.seeds})")
    ax.scatter(xs, [h[m]["noise_floor_mean"] for m in xs], color="k", marker="_", s=400, zorder=3,
               label="noise floor (same block, two halves of the probes)")
    ax.set_ylim(0, 1)
    ax.set_ylabel("mean pairwise JS distance")
    ax.set_title("Block heterogeneity at initialisation", fontsize=10)
    ax.legend(fontsize=7, loc="upper right")
    ax.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    fig.savefig(out / "heterogeneity.png")
    plt.close(fig)

    shown = [m for m in ("tiny-transformer", "tiny-cnn", "tiny-mlp") if m in first]
    if shown:
        fig, axes = plt.subplots(len(shown), 1, figsize=(8, 3.3 * len(shown)), dpi=100)
        axes = [axes] if len(shown) == 1 else list(axes)
        for ax, m in zip(axes, shown):
            plot_spectra(first[m], ax=ax, title=f"{m}: heterogeneity {first[m].heterogeneity:.3f}",
                         legend=m != "tiny-transformer")
        fig.tight_layout()
        fig.savefig(out / "spectra.png")
        plt.close(fig)
        fig, axes = plt.subplots(1, len(shown), figsize=(5.2 * len(shown), 5.2), dpi=100)
        axes = [axes] if len(shown) == 1 else list(axes)
        for ax, m in zip(axes, shown):
            plot_js_matrix(first[m], ax=ax, title=m)
        fig.tight_layout()
        fig.savefig(out / "js_matrices.png")
        plt.close(fig)

    results["settings"] = {"seeds": seeds, "heterogeneity": "blockopt.hessian.heterogeneity defaults "
                           "(curvature weighting, symlog, floor 1e-3 x median block max, sigma 0.25 decades, "
                           "4 probes x 40 steps, deflate 8, blocks = tensors with >= 2 dims)",
                           "threads": 1, "dtype": "float32"}
    results["environment"] = {"torch": torch.__version__, "python": platform.python_version(),
                              "platform": platform.platform(), "seconds": time.perf_counter() - t0}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    if args.docs:
        import shutil

        Path(args.docs).mkdir(parents=True, exist_ok=True)
        for src, dst in (("heterogeneity.png", "hessian_heterogeneity.png"), ("query_hessian.png", "hessian_query.png")):
            if (out / src).is_file():
                shutil.copyfile(out / src, Path(args.docs) / dst)

    # summary on stdout
    print(f"block heterogeneity at initialisation (seeds {args.seeds}):")
    for m in xs:
        print(f"  {m:<18} {h[m]['mean']:.3f} +- {h[m]['std']:.3f}   noise floor {h[m]['noise_floor_mean']:.3f}")
    print("dense Hessians (score / random with the same block sizes):")
    for r in results["dense"]:
        if r["seed"] != seeds[0]:
            continue
        print(f"  {r['model']} {r['param']}: " + ", ".join(
            f"{p['partition']} {p['score']:.3f}/{p['random_same_sizes']:.3f}" for p in r["partitions"]))
    heads = [(p["score"], p["random_same_sizes"]) for r in results["dense"] if r["model"] == "tiny-transformer"
             for p in r["partitions"] if p["partition"] == "per-head"]
    if heads:
        print(f"per-head mass, mean over {len(heads)} query/key weights x seeds: "
              f"{statistics.fmean(a for a, _ in heads):.3f} (random, same sizes: {statistics.fmean(b for _, b in heads):.3f})")
    if results["exact_check"]:
        e = results["exact_check"]
        print("SLQ vs exact (8 attention blocks): " + ", ".join(
            f"{w}: SLQ {e[w]['slq']:.3f}, exact {e[w]['exact']:.3f}" for w in ("curvature", "count")))
    print(f"written to {out} in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
