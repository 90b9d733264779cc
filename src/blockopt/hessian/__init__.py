"""The Hessian toolkit: Hessian-vector products, Lanczos, spectral densities, block heterogeneity,
dense Hessians with heatmaps, and partition scores.

The flow (``docs/algorithms.md`` section 7)::

    HessianOperator(model, batch, loss_fn, params)      # hvp.py: H v by double backward, one graph
      -> lanczos / top_eigenvalues                      # lanczos.py: full re-orthogonalisation
      -> slq / hutchinson / hutchpp                     # slq.py: spectral density, trace
      -> heterogeneity(op, plan=...)                    # heterogeneity.py: per-block densities, JS matrix
      -> dense_hessian / compare_partitions / plot_heatmap   # dense.py: structure and partition audit

This package uses :mod:`blockopt.partition` (plans) and :mod:`blockopt.kernels` (block geometry),
never :mod:`blockopt.optim`. Library code logs and raises; only ``blockopt hessian`` (``cli.py``) prints.

Example::

    >>> from blockopt.hessian import HessianOperator, heterogeneity
    >>> op = HessianOperator(model, (x, y), loss_fn=lambda m, b: m(*b))
    >>> res = heterogeneity(op, plan=blockopt.partition(model))
    >>> res.heterogeneity, res.noise_floor
"""

from .dense import (
    PartitionScore,
    compare_partitions,
    dense_hessian,
    partition_labels,
    partition_score,
    plan_slice,
    plot_heatmap,
    standard_partitions,
)
from .heterogeneity import (
    Block,
    HeterogeneityResult,
    block_spectra,
    heterogeneity,
    js_distance,
    js_matrix,
    model_heterogeneity,
    plot_js_matrix,
    plot_spectra,
    tensor_blocks,
)
from .hvp import (
    BatchTooLargeError,
    DoubleBackwardError,
    HessianInputError,
    HessianOperator,
    MatrixOperator,
    MemoryEstimate,
    estimate_hvp_memory,
    hvp,
    measurement_mode,
    select_parameters,
)
from .lanczos import EigenResult, LanczosResult, lanczos, top_eigenvalues
from .slq import Grid, SpectralQuadrature, TraceEstimate, common_grid, hutchinson, hutchpp, slq

__all__ = [
    "BatchTooLargeError",
    "Block",
    "DoubleBackwardError",
    "EigenResult",
    "Grid",
    "HessianInputError",
    "HessianOperator",
    "HeterogeneityResult",
    "LanczosResult",
    "MatrixOperator",
    "MemoryEstimate",
    "PartitionScore",
    "SpectralQuadrature",
    "TraceEstimate",
    "block_spectra",
    "common_grid",
    "compare_partitions",
    "dense_hessian",
    "estimate_hvp_memory",
    "heterogeneity",
    "hutchinson",
    "hutchpp",
    "hvp",
    "js_distance",
    "js_matrix",
    "lanczos",
    "measurement_mode",
    "model_heterogeneity",
    "partition_labels",
    "partition_score",
    "plan_slice",
    "plot_heatmap",
    "plot_js_matrix",
    "plot_spectra",
    "select_parameters",
    "slq",
    "standard_partitions",
    "tensor_blocks",
    "top_eigenvalues",
]
