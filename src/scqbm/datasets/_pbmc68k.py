"""Scanpy's bundled ``pbmc68k_reduced`` with integer counts rebuilt from ``raw.X``."""

from __future__ import annotations

import numpy as np

PBMC68K_LABELS_KEY = "bulk_labels"


def pbmc68k_counts(max_rounding_error: float = 0.3):
    """700 PBMCs x 765 genes, FACS-based ``bulk_labels``, integer counts in ``X`` and a layer.

    ``raw.X`` of :func:`scanpy.datasets.pbmc68k_reduced` holds ``log1p(count * 1e4 /
    n_counts)``; inverting it with ``obs["n_counts"]`` gives back the integer counts of these
    765 genes (float32 rounding leaves errors well below 0.5, which is checked). It has one
    batch, so it serves bio-conservation benchmarks only.

    Parameters
    ----------
    max_rounding_error
        Largest tolerated distance of a rebuilt value from its integer; larger means the file
        is not what this function expects, and it raises.

    Examples
    --------
    >>> import scqbm
    >>> adata = scqbm.datasets.pbmc68k_counts()
    >>> scqbm.QBMVAE.setup_anndata(adata, layer="counts", labels_key="bulk_labels")

    """
    import anndata as ad
    import scanpy as sc
    import scipy.sparse as sp

    reduced = sc.datasets.pbmc68k_reduced()
    logged = reduced.raw.X
    logged = logged.toarray() if sp.issparse(logged) else np.asarray(logged)
    scaled = np.expm1(logged.astype(np.float64)) * reduced.obs["n_counts"].to_numpy()[:, None]
    values = scaled / 1e4
    counts = np.round(values)
    if (error := np.abs(values - counts).max()) > max_rounding_error:
        raise ValueError(
            f"pbmc68k_reduced's raw.X does not invert to integer counts (max error {error:.2f}); "
            "scanpy's bundled file may have changed."
        )
    X = sp.csr_matrix(counts.astype(np.float32))
    obs = reduced.obs[[PBMC68K_LABELS_KEY, "n_genes", "percent_mito", "n_counts", "phase"]]
    adata = ad.AnnData(X, obs=obs.copy(), var=reduced.raw.var[[]].copy())
    adata.layers["counts"] = X.copy()
    adata.obsm["X_umap_scanpy"] = reduced.obsm["X_umap"].copy()
    return adata
