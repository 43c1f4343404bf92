"""Integration task: scib-metrics bio conservation and batch correction, raw and aggregated."""

from __future__ import annotations

import numpy as np
import pandas as pd
from anndata import AnnData

__all__ = ["BATCH", "BIO", "aggregate_scib", "exact_neighbors", "scib_metrics_for_embedding"]

BIO = "Bio conservation"
BATCH = "Batch correction"


def exact_neighbors(X: np.ndarray, n_neighbors: int):
    """Exact Euclidean nearest neighbours (scikit-learn) as scib-metrics ``NeighborsResults``.

    Used instead of scib-metrics' default pynndescent: exact, deterministic, and much faster
    at these sizes (pynndescent's numba compilation alone takes about a minute here).
    """
    from scib_metrics.nearest_neighbors import NeighborsResults
    from sklearn.neighbors import NearestNeighbors

    nn = NearestNeighbors(n_neighbors=n_neighbors, algorithm="auto").fit(X)
    distances, indices = nn.kneighbors(X)
    return NeighborsResults(indices=indices, distances=distances)


def scib_metrics_for_embedding(
    adata: AnnData,
    embedding: np.ndarray,
    batch_key: str | None,
    label_key: str,
    n_jobs: int = 1,
    exclude: tuple[str, ...] = (),
) -> dict[str, tuple[str, float]]:
    """Raw (unscaled) scib-metrics values of one embedding.

    Runs :class:`scib_metrics.benchmark.Benchmarker` with the default bio-conservation and
    batch-correction suites on this embedding alone, with ``adata.obsm["X_pca"]`` as the
    pre-integrated embedding and exact neighbours (:func:`exact_neighbors`; the Benchmarker's
    default is approximate pynndescent neighbours). Without a batch key only bio conservation
    is computed (a single dummy batch is passed, as the Benchmarker requires one).
    ``exclude`` names scib-metrics functions to leave out (for example ``"kbet_per_label"``,
    whose pynndescent compilation takes minutes on a cold process); totals are then not
    comparable to full-suite totals.

    Returns
    -------
    ``{metric name: (metric type, value)}``; aggregation (with or without min-max scaling
    across methods and seeds) is done by :func:`aggregate_scib`.

    """
    from scib_metrics.benchmark import BatchCorrection, Benchmarker, BioConservation

    key = "X_bench"
    obs = pd.DataFrame(index=adata.obs_names)
    obs["label"] = adata.obs[label_key].astype(str).to_numpy()
    obs["batch"] = adata.obs[batch_key].astype(str).to_numpy() if batch_key else "0"
    work = AnnData(X=np.zeros((adata.n_obs, 1), dtype=np.float32), obs=obs)
    work.obsm["X_pca"] = np.asarray(adata.obsm["X_pca"], dtype=np.float32)
    work.obsm[key] = np.asarray(embedding, dtype=np.float32)
    bench = Benchmarker(
        work,
        batch_key="batch",
        label_key="label",
        embedding_obsm_keys=[key],
        pre_integrated_embedding_obsm_key="X_pca",
        bio_conservation_metrics=BioConservation(
            **{k: False for k in exclude if k in BioConservation.__dataclass_fields__}
        ),
        batch_correction_metrics=BatchCorrection(
            **{k: False for k in exclude if k in BatchCorrection.__dataclass_fields__}
        )
        if batch_key
        else None,
        n_jobs=n_jobs,
        progress_bar=False,
    )
    bench.prepare(neighbor_computer=exact_neighbors)
    bench.benchmark()
    table = bench.get_results(min_max_scale=False)
    kinds = table.loc["Metric Type"]
    values = table.loc[key]
    return {
        name: (str(kinds[name]), float(values[name]))
        for name in table.columns
        if kinds[name] in (BIO, BATCH)
    }


def aggregate_scib(raw: pd.DataFrame, min_max_scale: bool) -> pd.DataFrame:
    """scIB aggregate scores per run, as ``Benchmarker.get_results`` computes them.

    Parameters
    ----------
    raw
        Long table with columns ``method``, ``seed``, ``metric``, ``metric_type`` and ``value``
        (one row per raw scib metric and run).
    min_max_scale
        Scale each metric to [0, 1] across all runs of the table (every method and seed) first,
        as ``Benchmarker.get_results(min_max_scale=True)`` does across embeddings.

    Returns
    -------
    One row per run (``method``, ``seed``) with ``Bio conservation``, ``Batch correction``
    (when batch metrics exist) and ``Total = 0.4 batch + 0.6 bio``.

    """
    wide = raw.pivot_table(index=["method", "seed"], columns="metric", values="value")
    types = raw.drop_duplicates("metric").set_index("metric")["metric_type"]
    if min_max_scale:
        low, high = wide.min(), wide.max()
        span = (high - low).replace(0.0, np.nan)
        wide = ((wide - low) / span).fillna(0.0)
    out = pd.DataFrame(index=wide.index)
    for kind in (BATCH, BIO):
        cols = [c for c in wide.columns if types[c] == kind]
        if cols:
            out[kind] = wide[cols].mean(axis=1)
    if BATCH in out and BIO in out:
        out["Total"] = 0.4 * out[BATCH] + 0.6 * out[BIO]
    return out.reset_index()
