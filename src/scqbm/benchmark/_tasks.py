"""Tasks that score an embedding: classification, trajectory, rare cells and prior energy.

Each task takes the prepared dataset and one method's output and returns ``{metric: value}``;
the scib-metrics integration task lives in :mod:`scqbm.benchmark._integration`.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import scanpy as sc
from anndata import AnnData
from scipy import stats

__all__ = [
    "SUBSAMPLE_FRACTIONS",
    "best_matching_cluster",
    "classification_metrics",
    "energy_metrics",
    "leiden_clusters",
    "rare_cell_metrics",
    "trajectory_metrics",
]

logger = logging.getLogger(__name__)

#: Fractions of all cells to which the rare-cell task subsamples one population.
SUBSAMPLE_FRACTIONS = (0.01, 0.005, 0.002)


# ------------------------------------------------------------------ classification
def classification_metrics(
    embedding: np.ndarray,
    labels: np.ndarray,
    rare_labels: list[str],
    seed: int = 0,
    n_splits: int = 5,
) -> dict[str, float]:
    """Logistic regression on a frozen embedding, stratified ``n_splits``-fold.

    Features are standardised inside each fold. Classes with fewer cells than folds are left
    out (they cannot be stratified). Metrics are averaged over folds: accuracy, weighted and
    macro precision / recall / F1, and the F1 of each of ``rare_labels``.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    labels = np.asarray(labels).astype(str)
    counts = pd.Series(labels).value_counts()
    keep = np.isin(labels, counts[counts >= n_splits].index)
    X, y = np.asarray(embedding, dtype=np.float64)[keep], labels[keep]
    classes = np.unique(y)
    rare = [r for r in rare_labels if r in classes]
    folds = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    rows = []
    for train, test in folds.split(X, y):
        clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1_000))
        clf.fit(X[train], y[train])
        pred = clf.predict(X[test])
        row = {"accuracy": accuracy_score(y[test], pred)}
        for avg in ("weighted", "macro"):
            p, r, f, _ = precision_recall_fscore_support(
                y[test], pred, average=avg, zero_division=0
            )
            row.update({f"precision_{avg}": p, f"recall_{avg}": r, f"f1_{avg}": f})
        if rare:
            _, _, f, _ = precision_recall_fscore_support(
                y[test], pred, labels=rare, average=None, zero_division=0
            )
            row.update({f"f1[{name}]": v for name, v in zip(rare, f, strict=True)})
        rows.append(row)
    return {k: float(v) for k, v in pd.DataFrame(rows).mean().items()}


# -------------------------------------------------------------------- clustering
def leiden_clusters(
    embedding: np.ndarray, seed: int = 0, resolution: float = 1.0, n_neighbors: int = 15
) -> tuple[np.ndarray, AnnData]:
    """Leiden clusters (igraph) of the exact ``n_neighbors``-NN graph of an embedding.

    Returns the cluster labels and the AnnData holding the graph (reused for UMAP).
    """
    work = AnnData(obs=pd.DataFrame(index=[str(i) for i in range(len(embedding))]))
    work.obsm["X_emb"] = np.asarray(embedding, dtype=np.float32)
    sc.pp.neighbors(
        work, n_neighbors=n_neighbors, use_rep="X_emb", transformer="sklearn", random_state=seed
    )
    sc.tl.leiden(
        work,
        resolution=resolution,
        flavor="igraph",
        n_iterations=2,
        directed=False,
        random_state=seed,
    )
    return work.obs["leiden"].astype(str).to_numpy(), work


def best_matching_cluster(clusters: np.ndarray, members: np.ndarray) -> dict[str, float]:
    """Recall, precision and F1 of the cluster that best matches a population (by F1)."""
    members = np.asarray(members, dtype=bool)
    n_pop = members.sum()
    table = pd.crosstab(clusters, members)
    if n_pop == 0 or True not in table.columns:
        return {"recall": float("nan"), "precision": float("nan"), "f1": float("nan")}
    hits = table[True].to_numpy(dtype=float)
    sizes = table.sum(axis=1).to_numpy(dtype=float)
    recall = hits / n_pop
    precision = hits / sizes
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(hits > 0, 2 * recall * precision / (recall + precision), 0.0)
    best = int(np.argmax(f1))
    return {"recall": recall[best], "precision": precision[best], "f1": f1[best]}


def rare_cell_metrics(
    embedding: np.ndarray,
    labels: np.ndarray,
    rare_labels: list[str],
    subsample_label: str | None,
    seed: int = 0,
    fractions: tuple[float, ...] = SUBSAMPLE_FRACTIONS,
) -> tuple[dict[str, float], AnnData]:
    """Recovery of small populations by Leiden clustering of the embedding.

    For each of ``rare_labels``: recall, precision and F1 of the best-matching Leiden cluster
    (resolution 1, 15 exact nearest neighbours). Then ``subsample_label`` is randomly
    subsampled to each of ``fractions`` of the remaining cells, the graph and clusters are
    recomputed on the subsampled embedding, and the same scores are reported. The embedding is
    frozen: this measures how separable a population stays in the learned space at low
    prevalence, not how well a model learns it from few cells (for that, see the simulation,
    whose rare types are rare in training too).

    Returns
    -------
    The metrics and the AnnData with the full data's neighbour graph (for UMAP).

    """
    labels = np.asarray(labels).astype(str)
    clusters, graph = leiden_clusters(embedding, seed=seed)
    out: dict[str, float] = {"n_clusters": float(len(np.unique(clusters)))}
    recalls = []
    for name in rare_labels:
        scores = best_matching_cluster(clusters, labels == name)
        out.update({f"{k}[{name}]": float(v) for k, v in scores.items()})
        recalls.append(scores["recall"])
    if recalls:
        out["recall_mean_rare"] = float(np.nanmean(recalls))
    if subsample_label is not None and subsample_label in labels:
        rng = np.random.default_rng(seed)
        target = np.flatnonzero(labels == subsample_label)
        others = np.flatnonzero(labels != subsample_label)
        for fraction in fractions:
            n_keep = max(2, round(fraction * others.size / (1 - fraction)))
            if n_keep >= target.size:
                continue
            kept = np.sort(np.concatenate([others, rng.choice(target, n_keep, replace=False)]))
            sub_clusters, _ = leiden_clusters(embedding[kept], seed=seed)
            scores = best_matching_cluster(sub_clusters, labels[kept] == subsample_label)
            out.update({f"subsample_{fraction:g}_{k}": float(v) for k, v in scores.items()})
    return out, graph


# -------------------------------------------------------------------- trajectory
def trajectory_metrics(
    embedding: np.ndarray,
    pseudotime: np.ndarray,
    branch: np.ndarray,
    n_neighbors: int = 15,
) -> dict[str, float]:
    """Diffusion pseudotime on the embedding against the ground-truth ordering.

    On the trajectory cells only (``branch`` not ``"none"``): exact kNN graph, diffusion map
    and :func:`scanpy.tl.dpt` rooted at the cell with the smallest true pseudotime. Cells DPT
    cannot reach (infinite pseudotime) are ranked last. Reports Kendall's tau rescaled to
    ``(tau + 1) / 2`` on the whole trajectory and along each branch (stem plus that branch).
    """
    branch = np.asarray(branch).astype(str)
    on = branch != "none"
    t_true = np.asarray(pseudotime, dtype=float)[on]
    work = AnnData(
        obs=pd.DataFrame({"branch": branch[on]}, index=[str(i) for i in range(on.sum())])
    )
    work.obsm["X_emb"] = np.asarray(embedding, dtype=np.float32)[on]
    sc.pp.neighbors(work, n_neighbors=n_neighbors, use_rep="X_emb", transformer="sklearn")
    sc.tl.diffmap(work, n_comps=15)
    work.uns["iroot"] = int(np.argmin(t_true))
    sc.tl.dpt(work)
    dpt = work.obs["dpt_pseudotime"].to_numpy(dtype=float)
    unreachable = ~np.isfinite(dpt)
    if unreachable.any():
        dpt[unreachable] = np.nanmax(dpt[~unreachable]) + 1.0 if (~unreachable).any() else 0.0

    def scaled_tau(mask: np.ndarray) -> float:
        tau = stats.kendalltau(t_true[mask], dpt[mask]).statistic
        return float((tau + 1) / 2) if np.isfinite(tau) else float("nan")

    out = {
        "kendall_tau_scaled": scaled_tau(np.ones(on.sum(), dtype=bool)),
        "fraction_unreachable": float(unreachable.mean()),
    }
    for name in sorted(set(work.obs["branch"]) - {"stem"}):
        out[f"kendall_tau_scaled[stem+{name}]"] = scaled_tau(
            work.obs["branch"].isin(["stem", name]).to_numpy()
        )
    return out


# ------------------------------------------------------------------------ energy
def energy_metrics(extras: dict[str, np.ndarray], labels: np.ndarray) -> dict[str, float]:
    """Per-cell prior energy of QBMVAE: level by cell type and link with the ELBO terms.

    Spearman correlations of the energy ``E_q[E(z)]`` with the per-cell reconstruction
    log-likelihood ``log p(x|z)``, the KL term and the ELBO (one posterior sample each), and
    the mean and standard deviation of the energy per cell type.
    """
    energy = extras["energy"]
    out: dict[str, float] = {
        "energy_mean": float(energy.mean()),
        "energy_sd": float(energy.std()),
    }
    for term in ("reconstruction_ll", "kl_z", "elbo"):
        if term in extras:
            out[f"spearman_energy_vs_{term}"] = float(
                stats.spearmanr(energy, extras[term]).statistic
            )
    frame = pd.DataFrame({"energy": energy, "label": np.asarray(labels).astype(str)})
    for name, group in frame.groupby("label")["energy"]:
        out[f"energy_mean[{name}]"] = float(group.mean())
    return out
