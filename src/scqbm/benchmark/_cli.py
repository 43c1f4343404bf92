"""Arguments and entry point of ``scqbm benchmark``."""

from __future__ import annotations

import argparse
import json
import shlex
import sys

from ._data import DATASETS
from ._methods import DEFAULT_METHODS, METHODS, resolve_method
from ._suite import TASKS, run_suite
from ._training import REGIMES

__all__ = ["add_benchmark_arguments", "run_benchmark"]


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _methods(value: str) -> list[str]:
    """Split on commas outside parentheses: ``pca,qbmvae_rbm(n_latent=16,beta=5)``."""
    items, depth, current = [], 0, ""
    for char in value:
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == "," and depth == 0:
            items.append(current)
            current = ""
        else:
            current += char
    items.append(current)
    return [item.strip() for item in items if item.strip()]


def _ints(value: str) -> list[int]:
    return [int(v) for v in _csv(value)]


def add_benchmark_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the options of ``scqbm benchmark`` to ``parser``."""
    parser.description = (
        "Run methods x seeds on a dataset, score integration (scib-metrics), classification, "
        "trajectory, rare cells and prior energy, and write CSVs, a markdown summary and "
        "figures. Finished runs are cached and reused."
    )
    parser.add_argument(
        "--dataset", choices=sorted(DATASETS), default="simulated", help="(default: %(default)s)"
    )
    parser.add_argument(
        "--methods",
        type=_methods,
        default=list(DEFAULT_METHODS),
        help=(
            f"Comma-separated, from {sorted(METHODS)}, or variants with model arguments such "
            "as 'qbmvae_rbm(n_latent=16,beta=5.0)' (default: "
            f"{','.join(DEFAULT_METHODS)})."
        ),
    )
    parser.add_argument(
        "--seeds", type=_ints, default=[0, 1, 2], help="Comma-separated (default: 0,1,2)."
    )
    parser.add_argument(
        "--training",
        choices=REGIMES,
        default="matched",
        help=(
            "Training regime of the neural methods: 'default' (Model(adata).train() exactly: "
            "scvi's epoch heuristic, full KL warm-up, its batch size), 'matched' (--max-epochs "
            "and batch size 128 for all) or 'early_stopping' (defaults plus scvi's early "
            "stopping on the validation ELBO). Default: %(default)s."
        ),
    )
    parser.add_argument(
        "--max-epochs", type=int, default=20, help="Epochs of the matched regime (%(default)s)."
    )
    parser.add_argument(
        "--tasks", type=_csv, default=list(TASKS), help=f"Subset of {','.join(TASKS)}."
    )
    parser.add_argument("--out", "-o", default="benchmark_results", help="Results folder.")
    parser.add_argument(
        "--cache-dir", help="Cache of runs (embeddings; default OUT/runs). Keep it out of git."
    )
    parser.add_argument("--max-cells", type=int, help="Subsample the dataset first.")
    parser.add_argument(
        "--dataset-kwargs",
        type=json.loads,
        default=None,
        help="JSON dict for the loader, e.g. '{\"batch_strength\": 1.0}' for simulated.",
    )
    parser.add_argument("--n-jobs", type=int, default=1, help="scib-metrics neighbour jobs.")
    parser.add_argument(
        "--scib-exclude",
        type=_csv,
        default=[],
        help="scib-metrics functions to leave out, e.g. kbet_per_label (quick runs only).",
    )
    parser.add_argument(
        "--method-seeds",
        type=lambda v: {k: int(n) for k, n in (item.rsplit("=", 1) for item in _methods(v))},
        default=None,
        help="Fewer seeds for some methods, e.g. scvi_default=1.",
    )
    parser.add_argument("--threads", type=int, help="torch CPU threads.")
    parser.add_argument("--no-umap", action="store_true", help="Skip UMAPs.")
    parser.add_argument("--no-figures", action="store_true", help="Skip figures.")
    parser.add_argument("--no-progress", action="store_true", help="No progress bar.")
    parser.add_argument(
        "--only-cached",
        action="store_true",
        help="Train nothing: report the finished runs of the cache, list the others as not run.",
    )
    parser.add_argument(
        "--import-metrics",
        metavar="PATH",
        help=(
            "metrics.csv of an earlier page of the same dataset and configuration: its runs "
            "fill in the planned (method, seed) runs that the cache lacks (the cache wins); "
            "the scIB aggregates and means are recomputed over all runs and the page lists "
            "which runs were imported."
        ),
    )
    return parser


def run_benchmark(args: argparse.Namespace) -> int:
    """Run ``scqbm benchmark`` from parsed arguments and print where the results are."""
    for spec in args.methods:
        try:
            resolve_method(spec)
        except ValueError as err:
            print(f"scqbm benchmark: {err}", file=sys.stderr)
            return 2
    command = "scqbm " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    result = run_suite(
        dataset=args.dataset,
        methods=args.methods,
        seeds=args.seeds,
        out=args.out,
        max_epochs=args.max_epochs,
        training=args.training,
        tasks=args.tasks,
        cache_dir=args.cache_dir,
        max_cells=args.max_cells,
        dataset_kwargs=args.dataset_kwargs,
        n_jobs=args.n_jobs,
        scib_exclude=args.scib_exclude,
        method_seeds=args.method_seeds,
        threads=args.threads,
        umap=not args.no_umap,
        figures=not args.no_figures,
        progress=not args.no_progress,
        command=command,
        only_cached=args.only_cached,
        import_metrics=args.import_metrics,
    )
    print(
        f"scqbm benchmark: {result.n_computed} runs computed, {result.n_cached} reused, "
        f"{int((result.runs['source'] == 'imported').sum())} imported; "
        f"results in {result.out}/ (README.md, metrics.csv, summary.csv, figures/)"
    )
    for name, reason in result.skipped.items():
        print(f"  not run: {name}: {reason}")
    return 0
