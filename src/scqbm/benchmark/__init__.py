"""The evidence suite: QBMVAE against PCA, scVI, a Gaussian-prior ablation and external peers.

``run_suite`` runs methods x seeds on a dataset and scores five tasks (scib-metrics
integration with and without min-max scaling, classification on frozen embeddings, diffusion
pseudotime against ground truth, rare-cell recovery, QBMVAE prior energy), caching each run;
``scqbm benchmark`` is its command line.
"""

from __future__ import annotations

from ._cli import add_benchmark_arguments, run_benchmark
from ._data import DATASETS, BenchmarkDataset, load_dataset
from ._de import KANG_MARKERS, de_marker_metrics, marker_ranks, model_de_metrics
from ._integration import aggregate_scib, scib_metrics_for_embedding
from ._methods import (
    DEFAULT_METHODS,
    METHODS,
    Method,
    MethodOutput,
    gaussian_ablation_kwargs,
    per_cell_elbo_terms,
    resolve_method,
)
from ._suite import TASKS, SuiteResult, run_suite, summarize
from ._tasks import (
    best_matching_cluster,
    classification_metrics,
    energy_metrics,
    rare_cell_metrics,
    trajectory_metrics,
)
from ._training import REGIMES, Training

__all__ = [
    "DATASETS",
    "DEFAULT_METHODS",
    "KANG_MARKERS",
    "METHODS",
    "REGIMES",
    "TASKS",
    "BenchmarkDataset",
    "Method",
    "MethodOutput",
    "SuiteResult",
    "Training",
    "add_benchmark_arguments",
    "aggregate_scib",
    "best_matching_cluster",
    "classification_metrics",
    "de_marker_metrics",
    "energy_metrics",
    "gaussian_ablation_kwargs",
    "load_dataset",
    "marker_ranks",
    "model_de_metrics",
    "per_cell_elbo_terms",
    "rare_cell_metrics",
    "resolve_method",
    "run_benchmark",
    "run_suite",
    "scib_metrics_for_embedding",
    "summarize",
    "trajectory_metrics",
]
