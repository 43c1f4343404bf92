"""Benchmark datasets: loading, gene selection and the shared preprocessing."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import scanpy as sc
from anndata import AnnData

from ._de import KANG_MARKERS

__all__ = ["DATASETS", "BenchmarkDataset", "load_dataset"]


@dataclass
class BenchmarkDataset:
    """A dataset prepared for the suite.

    Attributes
    ----------
    name
        Registry name.
    adata
        Raw counts in ``layers["counts"]``, log-normalised counts (1e4 per cell) in ``X``, the
        unintegrated 50-component PCA in ``obsm["X_pca"]``.
    batch_key
        obs column with the batch, or ``None`` (bio conservation only).
    label_key
        obs column with the cell-type labels.
    description
        One line for the report.
    rare_labels
        Populations whose recall in Leiden clusters is reported (the smallest by default).
    subsample_label
        Population that is subsampled to 1%, 0.5% and 0.2% of the cells for the rare-cell task.
    has_trajectory
        Whether ``obs["pseudotime"]`` and ``obs["branch"]`` hold a ground-truth trajectory.
    markers
        Canonical marker genes per label, scored by the differential-expression task.

    """

    name: str
    adata: AnnData
    batch_key: str | None
    label_key: str
    description: str
    rare_labels: list[str] = field(default_factory=list)
    subsample_label: str | None = None
    has_trajectory: bool = False
    markers: dict[str, list[str]] = field(default_factory=dict)


def _smallest_labels(adata: AnnData, label_key: str, n: int) -> list[str]:
    counts = adata.obs[label_key].value_counts()
    return [str(x) for x in counts[counts > 0].sort_values().index[:n]]


def _smallest_above(adata: AnnData, label_key: str, fraction: float) -> str | None:
    counts = adata.obs[label_key].value_counts() / adata.n_obs
    above = counts[counts >= fraction].sort_values()
    return str(above.index[0]) if len(above) else None


def _prepare(
    adata: AnnData, layer: str | None, max_cells: int | None, seed: int, n_comps: int = 50
) -> AnnData:
    if max_cells is not None and max_cells < adata.n_obs:
        rng = np.random.default_rng(seed)
        adata = adata[np.sort(rng.choice(adata.n_obs, max_cells, replace=False))]
    adata = adata.copy()
    counts = adata.layers[layer] if layer is not None else adata.X
    adata.X = counts.copy()
    sc.pp.filter_genes(adata, min_counts=1)
    sc.pp.filter_cells(adata, min_counts=1)
    # anndata >= 0.13 lists X itself as `layers[None]`: only named layers are dropped.
    for key in [key for key in adata.layers if key is not None]:
        del adata.layers[key]
    adata.layers["counts"] = adata.X.copy()
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    sc.pp.pca(adata, n_comps=min(n_comps, adata.n_vars - 1, adata.n_obs - 1), random_state=0)
    return adata


def _kang(max_cells: int | None = None, seed: int = 0, **_) -> BenchmarkDataset:
    from scqbm import datasets

    adata = datasets.kang_ifnb()
    adata = adata[:, np.asarray(adata.var[datasets.KANG_HVG_KEY], dtype=bool)]
    adata = _prepare(adata, None, max_cells, seed)
    labels = datasets.KANG_LABELS_KEY
    return BenchmarkDataset(
        name="kang",
        adata=adata,
        batch_key=datasets.KANG_BATCH_KEY,
        label_key=labels,
        description=(
            f"Kang 2018 IFN-beta PBMCs (scqbm.datasets.kang_ifnb), {adata.n_obs:,} cells x "
            f"{adata.n_vars:,} HVGs (`{datasets.KANG_HVG_KEY}`); batch "
            f"'{datasets.KANG_BATCH_KEY}' (CTRL/STIM), labels '{labels}'"
        ),
        rare_labels=_smallest_labels(adata, labels, 2),
        subsample_label=_smallest_above(adata, labels, 0.02),
        markers=KANG_MARKERS,
    )


def _pbmc68k(max_cells: int | None = None, seed: int = 0, **_) -> BenchmarkDataset:
    from scqbm import datasets

    adata = datasets.pbmc68k_counts()
    labels = datasets.PBMC68K_LABELS_KEY
    adata = _prepare(adata, "counts" if "counts" in adata.layers else None, max_cells, seed)
    return BenchmarkDataset(
        name="pbmc68k",
        adata=adata,
        batch_key=None,
        label_key=labels,
        description=(
            f"scanpy pbmc68k_reduced with rebuilt counts (scqbm.datasets.pbmc68k_counts), "
            f"{adata.n_obs:,} cells x {adata.n_vars:,} genes; FACS-based '{labels}'; one batch "
            "(bio conservation only)"
        ),
        rare_labels=_smallest_labels(adata, labels, 2),
        subsample_label=_smallest_above(adata, labels, 0.02),
    )


def _simulated(max_cells: int | None = None, seed: int = 0, **kwargs) -> BenchmarkDataset:
    from scqbm.datasets._simulate import simulate

    # A moderate batch effect: with batch_strength=0.5 every 20-epoch model (scVI, the Gaussian
    # ablation, QBMVAE) left the two batches in disconnected graph components, so the
    # trajectory and rare-cell tasks measured only that split.
    params = {"n_cells": 4_000, "n_genes": 1_000, "batch_strength": 0.2, "seed": 0, **kwargs}
    adata = simulate(**params)
    adata = _prepare(adata, "counts", max_cells, seed)
    rare = sorted(c for c in adata.obs["cell_type"].cat.categories if c.startswith("rare_"))
    return BenchmarkDataset(
        name="simulated",
        adata=adata,
        batch_key="batch",
        label_key="cell_type",
        description=(
            f"scqbm.datasets.simulate({', '.join(f'{k}={v!r}' for k, v in params.items())}): "
            f"{adata.n_obs:,} cells x {adata.n_vars:,} genes, branching trajectory, "
            f"rare types {rare}"
        ),
        rare_labels=rare,
        subsample_label=_childless_type(adata),
        has_trajectory=True,
    )


def _childless_type(adata: AnnData) -> str | None:
    """A common simulated type that no rare type derives from (rare_k's parent is type_k mod C).

    Subsampling a rare type's parent would leave its few cells in the rare type's cluster.
    """
    types = [c for c in adata.obs["cell_type"].cat.categories if c.startswith("type_")]
    n_rare = sum(c.startswith("rare_") for c in adata.obs["cell_type"].cat.categories)
    childless = types[n_rare:] if n_rare < len(types) else []
    return childless[-1] if childless else (types[-1] if types else None)


def _scib_loader(name: str):
    def load(max_cells: int | None = None, seed: int = 0, **_) -> BenchmarkDataset:
        import scanpy as sc

        from scqbm import datasets

        spec = datasets.SCIB_DATASETS[name]
        adata = datasets.load_scib(name)  # raises DatasetUnavailableError offline
        layer = spec.counts_layer if spec.counts_layer in adata.layers else None
        sc.pp.highly_variable_genes(
            adata, n_top_genes=2_000, flavor="seurat_v3", layer=layer, batch_key=spec.batch_key
        )
        adata = adata[:, np.asarray(adata.var["highly_variable"], dtype=bool)]
        adata = _prepare(adata, layer, max_cells, seed)
        return BenchmarkDataset(
            name=name,
            adata=adata,
            batch_key=spec.batch_key,
            label_key=spec.labels_key,
            description=(
                f"scIB {name} (scqbm.datasets.load_scib), {adata.n_obs:,} cells x "
                f"{adata.n_vars:,} seurat_v3 HVGs; batch '{spec.batch_key}', labels "
                f"'{spec.labels_key}'"
            ),
            rare_labels=_smallest_labels(adata, spec.labels_key, 2),
            subsample_label=_smallest_above(adata, spec.labels_key, 0.02),
        )

    return load


#: Registry of dataset names to loaders ``(max_cells=None, seed=0, **kwargs) -> BenchmarkDataset``.
DATASETS: dict[str, Callable[..., BenchmarkDataset]] = {
    "kang": _kang,
    "pbmc68k": _pbmc68k,
    "simulated": _simulated,
    "pancreas": _scib_loader("pancreas"),
    "immune_human": _scib_loader("immune_human"),
    "lung_atlas": _scib_loader("lung_atlas"),
}


def load_dataset(
    name: str, max_cells: int | None = None, seed: int = 0, **kwargs
) -> BenchmarkDataset:
    """Load and prepare a benchmark dataset by name.

    Parameters
    ----------
    name
        One of :data:`DATASETS` (``"kang"``, ``"pbmc68k"``, ``"simulated"``, ``"pancreas"``,
        ``"immune_human"``, ``"lung_atlas"``).
    max_cells
        Randomly subsample to this many cells (``seed``) before preprocessing.
    seed
        Seed of the subsampling.
    **kwargs
        Passed to the loader (for ``"simulated"``: arguments of
        :func:`scqbm.datasets.simulate`).

    Returns
    -------
    :class:`BenchmarkDataset`

    """
    if name not in DATASETS:
        raise ValueError(f"Unknown benchmark dataset {name!r}; choose from {sorted(DATASETS)}.")
    return DATASETS[name](max_cells=max_cells, seed=seed, **kwargs)
