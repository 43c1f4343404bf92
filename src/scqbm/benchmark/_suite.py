"""The suite runner: methods x seeds on one dataset, cached per run, then the report."""

from __future__ import annotations

import json
import logging
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ._cache import digest, load_output, regime_dir, run_dir_of, save_output
from ._data import BenchmarkDataset, load_dataset
from ._de import de_marker_metrics
from ._integration import aggregate_scib, scib_metrics_for_embedding
from ._methods import DEFAULT_METHODS, MethodOutput, resolve_method
from ._tasks import classification_metrics, energy_metrics, rare_cell_metrics, trajectory_metrics
from ._training import REGIMES, Training

__all__ = ["TASKS", "SuiteResult", "run_suite"]

logger = logging.getLogger(__name__)

#: Tasks of the suite, in the order they run.
TASKS = ("integration", "classification", "trajectory", "rare", "energy", "de")
_SUITE_VERSION = 2


@dataclass
class SuiteResult:
    """Outcome of :func:`run_suite`.

    Attributes
    ----------
    metrics
        Long table: ``dataset, method, seed, task, metric, metric_type, value`` (every metric of
        every run, plus the scIB aggregates with and without min-max scaling).
    summary
        Mean, standard deviation and number of seeds per ``method, task, metric``.
    out
        Results folder.
    files
        Paths written (CSV, markdown, figures).
    n_computed, n_cached
        Runs computed now and runs reused from the cache.
    skipped
        ``{method: reason}`` for methods that could not run (not installed, no batch, failed).
    runs
        Where each run on the page comes from: ``method, seed, source`` with source
        ``"computed"`` (trained or scored now), ``"cached"`` (reused from the cache) or
        ``"imported"`` (read from ``import_metrics``; no embedding behind it).
    imported_from
        The ``metrics.csv`` the imported runs were read from (``None`` without an import).

    """

    metrics: pd.DataFrame
    summary: pd.DataFrame
    out: Path
    files: list[Path] = field(default_factory=list)
    n_computed: int = 0
    n_cached: int = 0
    skipped: dict[str, str] = field(default_factory=dict)
    runs: pd.DataFrame = field(
        default_factory=lambda: pd.DataFrame(columns=["method", "seed", "source"])
    )
    imported_from: Path | None = None


def _task_rows(
    task: str,
    data: BenchmarkDataset,
    output: MethodOutput,
    seed: int,
    n_jobs: int,
    scib_exclude: tuple[str, ...],
    run_dir: Path,
) -> list[dict]:
    """Rows of one task for one run (empty when the task does not apply)."""
    adata = data.adata
    labels = adata.obs[data.label_key].astype(str).to_numpy()

    def rows_of(metrics: dict, metric_type: str = "") -> list[dict]:
        return [
            {"task": task, "metric": k, "metric_type": metric_type, "value": float(v)}
            for k, v in metrics.items()
        ]

    if task == "integration":
        return [
            {"task": "scib_raw", "metric": name, "metric_type": kind, "value": value}
            for name, (kind, value) in scib_metrics_for_embedding(
                adata,
                output.embedding,
                data.batch_key,
                data.label_key,
                n_jobs=n_jobs,
                exclude=scib_exclude,
            ).items()
        ]
    if task == "classification":
        return rows_of(
            classification_metrics(output.embedding, labels, data.rare_labels, seed=seed)
        )
    if task == "trajectory" and data.has_trajectory:
        return rows_of(
            trajectory_metrics(output.embedding, adata.obs["pseudotime"], adata.obs["branch"])
        )
    if task == "rare":
        metrics, _ = rare_cell_metrics(
            output.embedding, labels, data.rare_labels, data.subsample_label, seed=seed
        )
        return rows_of(metrics)
    if task == "energy" and "energy" in output.extras:
        return rows_of(energy_metrics(output.extras, labels))
    if task == "de" and data.markers and (run_dir / "model").exists():
        return rows_of(de_marker_metrics(run_dir / "model", data, seed=seed))
    return []


def _umap(embedding: np.ndarray, seed: int, run_dir: Path, graph=None) -> None:
    """UMAP of an embedding (from its 15-NN graph) saved as ``umap.npy`` in the run folder."""
    import scanpy as sc

    if graph is None:
        from ._tasks import leiden_clusters

        _, graph = leiden_clusters(embedding, seed=seed)
    sc.tl.umap(graph, random_state=seed)
    np.save(run_dir / "umap.npy", graph.obsm["X_umap"].astype(np.float32))


def run_suite(
    dataset: str | BenchmarkDataset = "simulated",
    methods: Sequence[str] = DEFAULT_METHODS,
    seeds: Sequence[int] = (0, 1, 2),
    out: str | Path = "benchmark_results",
    max_epochs: int = 20,
    training: str = "matched",
    tasks: Sequence[str] = TASKS,
    cache_dir: str | Path | None = None,
    max_cells: int | None = None,
    dataset_kwargs: dict | None = None,
    n_jobs: int = 1,
    scib_exclude: Sequence[str] = (),
    method_seeds: dict[str, int] | None = None,
    threads: int | None = None,
    umap: bool = True,
    figures: bool = True,
    progress: bool = True,
    command: str | None = None,
    only_cached: bool = False,
    import_metrics: str | Path | None = None,
) -> SuiteResult:
    """Run methods x seeds on a dataset, score every task and write the results folder.

    Each run (method, regime, seed) is cached under ``cache_dir``: the embedding (``.npy``),
    the per-cell model outputs (``.npz``), the training history (``history.csv``), the
    trained model (``model/``) and the metrics of each task (``metrics.json``), each with the
    configuration that produced it. A rerun with the same configuration reuses them; a task
    that is new or changed is scored from the cached run without refitting. Methods whose
    embedding does not depend on the seed (PCA, Scanorama) run once, with the first seed.

    With ``import_metrics``, the per-run values of an earlier ``metrics.csv`` (for example a
    committed results page whose cache is gone) are merged with the runs of the cache: every
    planned (method, seed) that the cache does not hold is taken from that file, the scIB
    aggregates (min-max scaling included) and the means are recomputed over all runs, and the
    page lists which runs were imported.

    Parameters
    ----------
    dataset
        A name of :data:`~scqbm.benchmark.DATASETS` or a prepared
        :class:`~scqbm.benchmark.BenchmarkDataset`.
    methods
        Names of :data:`~scqbm.benchmark.METHODS`, or variants with model arguments such as
        ``"qbmvae_rbm(n_latent=16, beta=5.0)"`` (see :func:`~scqbm.benchmark.resolve_method`).
    seeds
        Seeds of the runs (model initialisation and training, cross-validation folds, Leiden).
    out
        Results folder: ``metrics.csv``, ``summary.csv``, ``README.md`` and ``figures/``.
    max_epochs
        Epochs of every neural method (scVI, the Gaussian ablation, QBMVAE) in the
        ``matched`` regime, except ``scvi_default`` (scvi's own heuristic).
    training
        Training regime of the neural methods (:data:`~scqbm.benchmark.REGIMES`):
        ``"default"``, each model's ``Model(adata).train()`` exactly (scvi's epoch heuristic,
        its KL warm-up and batch size); ``"matched"``, ``max_epochs`` and batch size 128 for
        all; ``"early_stopping"``, the defaults with ``early_stopping=True``. Runs are cached
        per regime, checkpointed every 10 epochs, and an interrupted run resumes from its last
        checkpoint.
    tasks
        Subset of :data:`TASKS`.
    cache_dir
        Where runs are cached (default ``out/runs``; it holds embeddings, keep it out of git).
    max_cells
        Subsample the dataset to this many cells first.
    dataset_kwargs
        Extra arguments of the dataset loader (for ``"simulated"``: of
        :func:`scqbm.datasets.simulate`).
    n_jobs
        Jobs of the scib-metrics neighbour search.
    scib_exclude
        scib-metrics functions to leave out (e.g. ``["kbet_per_label"]`` for quick runs); the
        report lists them, and totals are then not comparable to full-suite totals.
    method_seeds
        Run some methods with fewer seeds, e.g. ``{"scvi_default": 1}`` (the first ones).
    threads
        ``torch.set_num_threads`` for training (default: unchanged).
    umap, figures
        Compute UMAPs (first seed of each method) and write figures.
    progress
        Show a progress bar over the runs.
    command
        The command line to record in the report (the CLI passes its own).
    only_cached
        Train nothing: neural runs without a finished fit in the cache are listed as not run
        (to write the page while long runs go on elsewhere); untrained methods still run.
    import_metrics
        A ``metrics.csv`` written by this suite for the same dataset and configuration. Its raw
        per-run rows (fit, scib-metrics values, classification, trajectory, rare cells, energy,
        DE; not the derived aggregates, which are recomputed) fill in the planned runs of
        ``methods`` x ``seeds`` that are neither in the cache nor computed now; a run in the
        cache always wins over an imported one. The file records no training configuration:
        importing it is a statement that it was produced by the same command. Imported runs
        have no embeddings, so UMAPs, training curves and energy box plots show only runs of
        the cache.

    Returns
    -------
    :class:`SuiteResult`

    Examples
    --------
    >>> from scqbm.benchmark import run_suite
    >>> result = run_suite(
    ...     "simulated", methods=["pca", "scvi", "qbmvae_rbm"], seeds=[0, 1], out="bench_sim"
    ... )
    >>> result.summary.query("metric == 'Total'")

    """
    from tqdm.auto import tqdm

    from ._report import write_report

    started = time.perf_counter()
    resolved = {spec: resolve_method(spec) for spec in methods}  # raises on unknown names
    bad_tasks = [t for t in tasks if t not in TASKS]
    if bad_tasks:
        raise ValueError(f"Unknown tasks {bad_tasks}; choose from {list(TASKS)}.")
    if not seeds:
        raise ValueError("Give at least one seed.")
    if training not in REGIMES:
        raise ValueError(f"Unknown training regime {training!r}; choose from {list(REGIMES)}.")
    regime_of = Training(regime=training, max_epochs=max_epochs)
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(cache_dir) if cache_dir is not None else out / "runs"
    dataset_kwargs = dict(dataset_kwargs or {})
    if isinstance(dataset, BenchmarkDataset):
        data = dataset
        data_config = {"name": data.name, "cells": data.adata.n_obs, "genes": data.adata.n_vars}
    else:
        data = load_dataset(dataset, max_cells=max_cells, **dataset_kwargs)
        data_config = {"name": dataset, "max_cells": max_cells, **dataset_kwargs}
    dataset_tag = f"{data.name}-{digest(data_config)}"

    skipped: dict[str, str] = {}
    runs: list[tuple[str, int]] = []
    for name in methods:
        method = resolved[name][0]
        reason = method.unavailable_reason(data.batch_key)
        if reason is not None:
            skipped[name] = reason
            continue
        n_seeds = (method_seeds or {}).get(name, len(seeds)) if method.stochastic else 1
        runs.extend((name, s) for s in seeds[: max(1, n_seeds)])

    all_rows: list[dict] = []
    sources: list[dict] = []
    umap_done: set[str] = set()
    n_cached = n_computed = 0
    bar = tqdm(runs, desc=f"scqbm benchmark {data.name}", unit="run", disable=not progress)
    for name, seed in bar:
        bar.set_postfix_str(f"{name} seed {seed}")
        method, model_kwargs = resolved[name]
        regime = regime_of.config() if method.trained else None
        run_dir = run_dir_of(cache, dataset_tag, name, seed, regime)
        fit_config = {
            "suite": _SUITE_VERSION,
            "data": data_config,
            "method": name,
            "seed": seed,
            **(regime or {}),
        }
        # UMAP coordinates are not metrics: a scored run is reused whether or not it has them,
        # and they are added to it when they are wanted (the first seed of each method that has
        # a run) and missing.
        want_umap = umap and name not in umap_done
        targets = {"rare": data.rare_labels, "subsample": data.subsample_label}
        metrics_file = run_dir / "metrics.json"
        saved = json.loads(metrics_file.read_text()) if metrics_file.exists() else {}
        if saved.get("fit") != json.loads(json.dumps(fit_config, default=str)):
            saved = {}
        cached_tasks = saved.get("tasks", {})
        output = None
        computed = False
        try:
            output = load_output(run_dir, fit_config)
            if output is None and only_cached and method.trained:
                state = run_dir / "train_state.json"
                where = json.loads(state.read_text())["epoch"] if state.exists() else 0
                skipped[f"{name} (seed {seed})"] = (
                    f"not run yet: no finished run in the cache ({where} epochs checkpointed)"
                )
                continue
            if output is None:
                computed = True
                cached_tasks = {}
                # Not ``training``: that name is the regime string the report needs.
                run_training = Training(
                    regime=regime_of.regime,
                    max_epochs=regime_of.max_epochs,
                    run_dir=run_dir,
                    progress=progress,
                    label=f"{data.name} {name} {regime_dir(regime)} seed {seed}",
                )
                run_dir.mkdir(parents=True, exist_ok=True)
                if method.trained:
                    output = method.fit(
                        data.adata, data.batch_key, seed, run_training, **model_kwargs
                    )
                else:
                    output = method.fit(data.adata, data.batch_key, seed, run_training)
                save_output(run_dir, fit_config, output)
            rows = [
                {"task": "fit", "metric": k, "metric_type": "", "value": float(v)}
                for k, v in {"seconds": output.seconds, **output.info}.items()
            ]
            for task in tasks:
                task_config = json.loads(
                    json.dumps(
                        {
                            "targets": targets,
                            "scib_exclude": sorted(scib_exclude) if task == "integration" else [],
                            "markers": data.markers if task == "de" else None,
                        },
                        default=str,
                    )
                )
                entry = cached_tasks.get(task)
                if entry is not None and entry.get("config") == task_config:
                    rows.extend(entry["rows"])
                    continue
                computed = True
                task_rows = _task_rows(
                    task, data, output, seed, n_jobs, tuple(scib_exclude), run_dir
                )
                cached_tasks[task] = {"config": task_config, "rows": task_rows}
                rows.extend(task_rows)
                metrics_file.write_text(
                    json.dumps({"fit": fit_config, "tasks": cached_tasks}, indent=1, default=str)
                )
            if want_umap and not (run_dir / "umap.npy").exists():
                _umap(output.embedding, seed, run_dir)
            umap_done.add(name)
        except Exception as err:  # one failing method must not sink the whole suite
            logger.error("%s seed %d failed:\n%s", name, seed, traceback.format_exc())
            skipped[f"{name} (seed {seed})"] = f"failed: {type(err).__name__}: {err}"
            continue
        n_computed += computed
        n_cached += not computed
        all_rows.extend({"method": name, "seed": seed, **r} for r in rows)
        sources.append(
            {"method": name, "seed": seed, "source": "computed" if computed else "cached"}
        )

    metrics = pd.DataFrame(
        all_rows, columns=["method", "seed", "task", "metric", "metric_type", "value"]
    )
    order = {run: i for i, run in enumerate(runs)}
    imported_from = None
    if import_metrics is not None:
        imported_from = Path(import_metrics)
        have = {(s["method"], s["seed"]) for s in sources}
        imported = _imported_rows(imported_from, data.name, runs, have, tasks)
        pairs = list(dict.fromkeys(zip(imported["method"], imported["seed"], strict=True)))
        for name, seed in pairs:
            skipped.pop(f"{name} (seed {seed})", None)
            sources.append({"method": name, "seed": seed, "source": "imported"})
        metrics = pd.concat([metrics, imported], ignore_index=True)
        position = [order[r] for r in zip(metrics["method"], metrics["seed"], strict=True)]
        metrics = metrics.iloc[np.argsort(position, kind="stable")].reset_index(drop=True)
    run_sources = pd.DataFrame(sources, columns=["method", "seed", "source"])
    position = [order[r] for r in zip(run_sources["method"], run_sources["seed"], strict=True)]
    run_sources = run_sources.iloc[np.argsort(position, kind="stable")].reset_index(drop=True)
    for derive in (_rare_means, _scib_aggregates):
        derived = derive(metrics)
        if not derived.empty:
            metrics = pd.concat([metrics, derived], ignore_index=True)
    metrics.insert(0, "dataset", data.name)
    summary = summarize(metrics)
    result = SuiteResult(
        metrics=metrics,
        summary=summary,
        out=out,
        n_computed=n_computed,
        n_cached=n_cached,
        skipped=skipped,
        runs=run_sources,
        imported_from=imported_from,
    )
    result.files = write_report(
        result,
        data,
        lambda m: (
            run_dir_of(
                cache, dataset_tag, m, 0, regime_of.config() if resolved[m][0].trained else None
            ).parent
        ),
        methods=[m for m in methods if m in {r[0] for r in runs}],
        seeds=list(seeds),
        max_epochs=max_epochs,
        training=training,
        command=command,
        figures=figures,
        scib_exclude=list(scib_exclude),
        seconds=time.perf_counter() - started,
    )
    return result


#: Rows of ``metrics.csv`` derived from the others (recomputed, never imported).
_DERIVED = (("scib", None), ("scib_minmax", None), ("rare", "f1_mean_rare"))


def _imported_rows(
    path: Path,
    dataset_name: str,
    runs: list[tuple[str, int]],
    have: set[tuple[str, int]],
    tasks: Sequence[str],
) -> pd.DataFrame:
    """Raw per-run rows of an earlier ``metrics.csv`` for the planned runs not in ``have``."""
    table = pd.read_csv(path)
    columns = ["method", "seed", "task", "metric", "metric_type", "value"]
    missing = {"dataset", *columns} - set(table.columns)
    if missing:
        raise ValueError(f"{path} is not a suite's metrics.csv: no columns {sorted(missing)}.")
    datasets = set(table["dataset"].astype(str))
    if datasets != {dataset_name}:
        raise ValueError(
            f"{path} holds datasets {sorted(datasets)}, not {dataset_name!r}: nothing imported."
        )
    table["seed"] = table["seed"].astype(int)
    table["metric_type"] = table["metric_type"].fillna("")
    derived = np.zeros(len(table), dtype=bool)
    for task, metric in _DERIVED:
        hit = table["task"] == task
        if metric is not None:
            hit &= table["metric"] == metric
        derived |= hit.to_numpy()
    wanted_tasks = {"fit", *tasks} | ({"scib_raw"} if "integration" in tasks else set())
    wanted_runs = set(runs) - have
    planned = [r in wanted_runs for r in zip(table["method"], table["seed"], strict=True)]
    keep = ~derived & table["task"].isin(wanted_tasks).to_numpy() & np.array(planned, dtype=bool)
    return table.loc[keep, columns].reset_index(drop=True)


def _rare_means(metrics: pd.DataFrame) -> pd.DataFrame:
    """Per run, the mean best-match F1 over the rare populations (``f1_mean_rare``)."""
    rows = metrics[(metrics["task"] == "rare") & metrics["metric"].str.startswith("f1[")]
    if rows.empty:
        return pd.DataFrame(columns=metrics.columns)
    means = rows.groupby(["method", "seed"], sort=False)["value"].mean().reset_index()
    means["task"], means["metric"], means["metric_type"] = "rare", "f1_mean_rare", ""
    return means[metrics.columns]


def _scib_aggregates(metrics: pd.DataFrame) -> pd.DataFrame:
    raw = metrics[metrics["task"] == "scib_raw"]
    if raw.empty:
        return pd.DataFrame(columns=metrics.columns)
    frames = []
    for scaled, task in ((False, "scib"), (True, "scib_minmax")):
        agg = aggregate_scib(raw, min_max_scale=scaled)
        long = agg.melt(id_vars=["method", "seed"], var_name="metric", value_name="value")
        long["task"] = task
        long["metric_type"] = "Aggregate score"
        frames.append(long)
    return pd.concat(frames, ignore_index=True)[metrics.columns]


def summarize(metrics: pd.DataFrame) -> pd.DataFrame:
    """Mean, standard deviation (ddof 1) and count over seeds per method, task and metric."""
    grouped = metrics.groupby(["method", "task", "metric"], sort=False)["value"]
    summary = grouped.agg(["mean", "std", "count"]).reset_index()
    return summary.rename(columns={"count": "n_seeds"})
