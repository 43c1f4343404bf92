"""Differential-expression task: canonical markers in the 1-vs-all DE of a trained model."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

__all__ = ["KANG_MARKERS", "de_marker_metrics", "marker_ranks", "model_de_metrics"]

logger = logging.getLogger(__name__)

#: Canonical markers of the Kang PBMC types (``cell_type_derived``) that the DE task looks for.
KANG_MARKERS = {
    "B": ["CD79A", "MS4A1"],
    "CD4 T": ["CD3D", "CD3E"],
    "NK": ["GNLY", "NKG7"],
    "CD14 Mono": ["CD14", "LYZ"],
    "CD16 Mono": ["FCGR3A", "MS4A7"],
    "pDC": ["LILRA4"],
}


def marker_ranks(
    de: pd.DataFrame, markers: list[str], fdr_column: str = "is_de_fdr_0.05"
) -> dict[str, float]:
    """Ranks of markers in one 1-vs-all comparison (1 = first), by ``lfc_mean`` and Bayes factor.

    Genes are ordered by decreasing ``lfc_mean`` (up in the group first) and by decreasing
    ``bayes_factor``; ties share the best rank. Markers missing from ``de`` (not among the
    genes the model was trained on) are left out. Returns, for each present marker,
    ``rank_lfc[gene]`` and ``rank_bf[gene]``, the best of each over the markers
    (``rank_lfc``, ``rank_bf``), and ``n_fdr``, the genes flagged by ``fdr_column``.
    """
    out: dict[str, float] = {}
    present = [g for g in markers if g in de.index]
    rank_lfc = de["lfc_mean"].rank(ascending=False, method="min")
    rank_bf = de["bayes_factor"].rank(ascending=False, method="min")
    for gene in present:
        out[f"rank_lfc[{gene}]"] = float(rank_lfc[gene])
        out[f"rank_bf[{gene}]"] = float(rank_bf[gene])
    if present:
        out["rank_lfc"] = float(rank_lfc[present].min())
        out["rank_bf"] = float(rank_bf[present].min())
    out["n_fdr"] = float(de[fdr_column].sum()) if fdr_column in de else float("nan")
    return out


def _load_model(model_dir: Path, adata, batch_key: str | None):
    import importlib

    from ._methods import _model_adata

    module, _, name = (model_dir / "model_class.txt").read_text().strip().rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    work = _model_adata(adata)
    cls.setup_anndata(work, batch_key=batch_key)
    return cls.load(str(model_dir), adata=work), work


def de_marker_metrics(
    model_dir: str | Path, data, seed: int = 0, batch_size: int = 1024
) -> dict[str, float]:
    """scvi-tools' 1-vs-all DE (``mode="change"``) of a saved model, scored on known markers.

    The model saved in ``model_dir`` (by the suite's training) is loaded on the dataset's
    counts; ``model.differential_expression(groupby=label_key, mode="change")`` runs with
    scvi-tools' defaults (uniform weights, ``delta=0.25``, FDR target 0.05). For each type with
    markers in ``data.markers``: the markers' ranks by ``lfc_mean`` and by Bayes factor
    (:func:`marker_ranks`) and the number of genes at FDR 0.05; ``n_fdr_total`` sums them over
    every 1-vs-all comparison, ``median_rank_lfc`` / ``median_rank_bf`` are the medians of the
    best rank per type.
    """
    model, _ = _load_model(Path(model_dir), data.adata, data.batch_key)
    return model_de_metrics(model, data, seed=seed, batch_size=batch_size)


def model_de_metrics(model, data, seed: int = 0, batch_size: int = 1024) -> dict[str, float]:
    """The metrics of :func:`de_marker_metrics` for a model in memory, set up on ``data``."""
    import torch

    torch.manual_seed(seed)
    np.random.seed(seed)  # noqa: NPY002 (scvi's DE draws cell pairs from numpy's global state)
    de = model.differential_expression(
        groupby=data.label_key, mode="change", batch_size=batch_size, silent=True
    )
    out: dict[str, float] = {}
    n_total = 0.0
    best_lfc, best_bf = [], []
    for group, frame in de.groupby("group1", observed=True):
        frame = frame.loc[~frame.index.duplicated()]
        n_fdr = float(frame["is_de_fdr_0.05"].sum())
        n_total += n_fdr
        markers = data.markers.get(str(group))
        if not markers:
            out[f"n_fdr[{group}]"] = n_fdr
            continue
        ranks = marker_ranks(frame, markers)
        out.update({f"{k.split('[')[0]}[{group}{_sub(k)}]": v for k, v in ranks.items()})
        if "rank_lfc" in ranks:
            best_lfc.append(ranks["rank_lfc"])
            best_bf.append(ranks["rank_bf"])
    out["n_fdr_total"] = n_total
    if best_lfc:
        out["median_rank_lfc"] = float(np.median(best_lfc))
        out["median_rank_bf"] = float(np.median(best_bf))
        out["n_types_top20_lfc"] = float(np.sum(np.asarray(best_lfc) <= 20))
        out["n_types_top20_bf"] = float(np.sum(np.asarray(best_bf) <= 20))
    return out


def _sub(key: str) -> str:
    """``rank_lfc[CD79A]`` -> ``:CD79A``; ``rank_lfc`` -> ``""``."""
    return f":{key.split('[', 1)[1][:-1]}" if "[" in key else ""
