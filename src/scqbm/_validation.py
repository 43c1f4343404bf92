"""Checks of user data that fail early, say what is wrong and how to fix it, and write nothing."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from anndata import AnnData


class InvalidInputError(ValueError):
    """User data cannot be used as given; the message says why and how to fix it."""


def _values(matrix) -> np.ndarray:
    """The stored values of a dense or sparse matrix (no copy of sparse structure)."""
    if sp.issparse(matrix):
        return np.asarray(matrix.data)
    return np.asarray(matrix)


def get_layer(adata: AnnData, layer: str | None):
    """``adata.X`` or ``adata.layers[layer]``, with a clear error if the layer is missing."""
    if layer is None:
        if adata.X is None:
            raise InvalidInputError(
                "adata.X is empty; pass `layer=` naming the layer with the data."
            )
        return adata.X
    if layer not in adata.layers:
        raise InvalidInputError(
            f"Layer {layer!r} not found in adata.layers (available: {list(adata.layers)}). "
            "Pass `layer=None` to use adata.X, or the name of the layer that holds the counts."
        )
    return adata.layers[layer]


def check_obs_keys(adata: AnnData, **keys: str | list[str] | None) -> None:
    """Every named obs column exists."""
    for argument, value in keys.items():
        names = [] if value is None else [value] if isinstance(value, str) else list(value)
        missing = [name for name in names if name not in adata.obs]
        if missing:
            raise InvalidInputError(
                f"`{argument}`: column(s) {missing} not found in adata.obs (available: "
                f"{list(adata.obs.columns)[:20]}{'...' if adata.obs.shape[1] > 20 else ''})."
            )


def check_expression(adata: AnnData, layer: str | None) -> None:
    """Finite, non-negative values; no all-zero cells or genes."""
    matrix = get_layer(adata, layer)
    where = "adata.X" if layer is None else f"adata.layers[{layer!r}]"
    values = _values(matrix)
    if not np.issubdtype(values.dtype, np.number):
        raise InvalidInputError(f"{where} is not numeric (dtype {values.dtype}).")
    if not np.isfinite(values).all():
        n_bad = int((~np.isfinite(values)).sum())
        raise InvalidInputError(
            f"{where} contains {n_bad} NaN or infinite values. Remove or impute them "
            "(for example `adata = adata[:, np.isfinite(X).all(0)]`) before setup."
        )
    if (values < 0).any():
        raise InvalidInputError(
            f"{where} contains negative values (minimum {values.min():.3g}). QBMVAE needs raw "
            "counts (or log-normalised, non-negative values with gene_likelihood='normal'); "
            "do not pass scaled or centred data (for example after sc.pp.scale)."
        )
    cell_totals = np.asarray(matrix.sum(axis=1)).ravel()
    gene_totals = np.asarray(matrix.sum(axis=0)).ravel()
    if (cell_totals == 0).any():
        raise InvalidInputError(
            f"{int((cell_totals == 0).sum())} cells have no counts in {where}; their library "
            "size is zero. Remove them first: `sc.pp.filter_cells(adata, min_counts=1)`."
        )
    if (gene_totals == 0).any():
        raise InvalidInputError(
            f"{int((gene_totals == 0).sum())} genes have no counts in {where}. Remove them "
            "first: `sc.pp.filter_genes(adata, min_counts=1)`."
        )


def check_counts(matrix, gene_likelihood: str) -> None:
    """Integer values for the count likelihoods."""
    values = _values(matrix)
    sample = values[:1_000_000] if values.ndim == 1 else values.ravel()[:1_000_000]
    if not np.all(np.mod(sample, 1) == 0):
        raise InvalidInputError(
            f"gene_likelihood={gene_likelihood!r} needs raw integer counts, but the registered "
            "data has non-integer values (log-normalised?). Pass the raw counts with "
            "`setup_anndata(adata, layer='counts')`, or use gene_likelihood='normal' for "
            "log-normalised data."
        )
