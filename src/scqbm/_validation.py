"""Checks of user data that fail early, say what is wrong and how to fix it, and write nothing.

The expression checks read the matrix in row chunks and look at every stored value, so they
work the same on dense, sparse and backed (``read_h5ad(path, backed="r")``) data without
loading a backed matrix into memory.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

logger = logging.getLogger(__name__)

#: Stored values read per chunk (about 32 MB of float64).
CHUNK_VALUES = 1 << 22


class InvalidInputError(ValueError):
    """User data cannot be used as given; the message says why and how to fix it."""


class MissingKeyError(InvalidInputError, KeyError):
    """A named ``adata.obs`` column is missing.

    Also a :class:`KeyError`, which is what scvi-tools raises for it (``except KeyError``
    in user code and scArches workflows keeps working).
    """

    __str__ = Exception.__str__  # the message itself, not KeyError's quoted repr


def get_layer(adata: AnnData, layer: str | None):
    """``adata.X`` or ``adata.layers[layer]``, with a clear error if the layer is missing."""
    if layer is None:
        if adata.X is None:
            raise InvalidInputError(
                "adata.X is empty; pass `layer=` naming the layer with the data."
            )
        return adata.X
    if layer not in adata.layers:
        available = [name for name in adata.layers if name is not None]
        raise InvalidInputError(
            f"Layer {layer!r} not found in adata.layers (available: {available}). "
            "Pass `layer=None` to use adata.X, or the name of the layer that holds the counts."
        )
    return adata.layers[layer]


def _where(layer: str | None) -> str:
    return "adata.X" if layer is None else f"adata.layers[{layer!r}]"


def check_obs_keys(adata: AnnData, **keys: str | list[str] | None) -> None:
    """Every named obs column exists."""
    for argument, value in keys.items():
        names = [] if value is None else [value] if isinstance(value, str) else list(value)
        missing = [name for name in names if name not in adata.obs]
        if missing:
            raise MissingKeyError(
                f"`{argument}`: column(s) {missing} not found in adata.obs (available: "
                f"{list(adata.obs.columns)[:20]}{'...' if adata.obs.shape[1] > 20 else ''})."
            )


def check_numeric_obs(
    adata: AnnData,
    continuous_covariate_keys: list[str] | None = None,
    size_factor_key: str | None = None,
) -> None:
    """Continuous covariates are finite numbers; size factors are finite and positive."""
    for key in continuous_covariate_keys or []:
        column = adata.obs[key]
        if not pd.api.types.is_numeric_dtype(column) or pd.api.types.is_bool_dtype(column):
            raise InvalidInputError(
                f"Continuous covariate {key!r} is not numeric (dtype {column.dtype}). Pass it "
                "in `categorical_covariate_keys` instead, or convert it with "
                f"`adata.obs[{key!r}] = adata.obs[{key!r}].astype(float)`."
            )
        values = column.to_numpy(dtype=float, na_value=np.nan)
        bad = ~np.isfinite(values)
        if bad.any():
            raise InvalidInputError(
                f"Continuous covariate {key!r} has {int(bad.sum())} NaN or infinite values "
                f"(first in cell {adata.obs_names[np.flatnonzero(bad)[0]]!r}). Impute or drop "
                f"those cells first, e.g. `adata = adata[np.isfinite(adata.obs[{key!r}])].copy()`."
            )
    if size_factor_key is not None:
        values = pd.to_numeric(adata.obs[size_factor_key], errors="coerce").to_numpy(float)
        bad = ~(np.isfinite(values) & (values > 0))
        if bad.any():
            raise InvalidInputError(
                f"Size factors in adata.obs[{size_factor_key!r}] must be finite and positive; "
                f"{int(bad.sum())} are not (first in cell "
                f"{adata.obs_names[np.flatnonzero(bad)[0]]!r})."
            )


def _row_chunks(matrix, n_rows: int, n_cols: int) -> Iterator[tuple[int, object]]:
    """``(start, block)`` over row blocks of a dense, sparse, h5py or backed sparse matrix."""
    if sp.issparse(matrix):
        nnz_per_row = max(1, int(matrix.nnz) // max(1, n_rows))
        step = max(1, CHUNK_VALUES // nnz_per_row)
    else:
        step = max(1, CHUNK_VALUES // max(1, n_cols))
    if sp.issparse(matrix) and not isinstance(matrix, sp.csr_matrix | sp.csr_array):
        matrix = matrix.tocsr()
    for start in range(0, n_rows, step):
        yield start, matrix[start : start + step]


def _block_values(block) -> np.ndarray:
    if sp.issparse(block):
        return np.asarray(block.data)
    return np.asarray(block).ravel()


@dataclass
class ExpressionSummary:
    """What one pass over the expression matrix found."""

    cell_totals: np.ndarray
    gene_totals: np.ndarray
    n_non_integer: int
    first_non_integer: float | None

    @property
    def is_integer(self) -> bool:
        return self.n_non_integer == 0


def scan_expression(matrix, where: str = "adata.X") -> ExpressionSummary:
    """Check every stored value (numeric, finite, non-negative) chunk by chunk.

    Returns per-cell and per-gene totals and how many values are not integers.
    """
    n_rows, n_cols = matrix.shape
    dtype = np.dtype(matrix.dtype)
    if not (np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating)):
        raise InvalidInputError(f"{where} is not numeric (dtype {dtype}).")
    check_integer = np.issubdtype(dtype, np.floating)
    cell_totals = np.zeros(n_rows)
    gene_totals = np.zeros(n_cols)
    n_non_finite = n_negative = n_non_integer = 0
    minimum = np.inf
    first_non_integer = None
    for start, block in _row_chunks(matrix, n_rows, n_cols):
        values = _block_values(block)
        if check_integer:
            finite = np.isfinite(values)
            n_non_finite += int(values.size - finite.sum())
            if n_non_finite:
                continue  # reported below; totals are meaningless now
        negative = values < 0
        if negative.any():
            n_negative += int(negative.sum())
            minimum = min(minimum, float(values.min()))
        if check_integer:
            fractional = np.mod(values, 1) != 0
            if fractional.any():
                if first_non_integer is None:
                    first_non_integer = float(values[np.argmax(fractional)])
                n_non_integer += int(fractional.sum())
        cell_totals[start : start + block.shape[0]] = np.asarray(block.sum(axis=1)).ravel()
        gene_totals += np.asarray(block.sum(axis=0), dtype=float).ravel()
    if n_non_finite:
        raise InvalidInputError(
            f"{where} contains {n_non_finite} NaN or infinite values. Remove or impute them "
            "(for example `adata = adata[:, np.isfinite(X).all(0)]`) before setup."
        )
    if n_negative:
        raise InvalidInputError(
            f"{where} contains {n_negative} negative values (minimum {minimum:.3g}). QBMVAE "
            "needs raw counts (or log-normalised, non-negative values with "
            "gene_likelihood='normal'); do not pass scaled or centred data (for example after "
            "sc.pp.scale)."
        )
    return ExpressionSummary(cell_totals, gene_totals, n_non_integer, first_non_integer)


def check_expression(adata: AnnData, layer: str | None) -> ExpressionSummary:
    """Every value finite and non-negative, every cell with counts; chunked, also if backed.

    Genes without counts are accepted (``prepare_query_anndata`` pads a query's missing genes
    with zeros) with a logged warning; non-integer values give a warning, as in scvi-tools.
    """
    where = _where(layer)
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise InvalidInputError(
            f"The AnnData has {adata.n_obs} cells and {adata.n_vars} genes; QBMVAE needs at "
            "least one of each."
        )
    summary = scan_expression(get_layer(adata, layer), where)
    empty_cells = summary.cell_totals == 0
    if empty_cells.any():
        raise InvalidInputError(
            f"{int(empty_cells.sum())} cells have no counts in {where} (first: "
            f"{adata.obs_names[np.flatnonzero(empty_cells)[0]]!r}); their library size is "
            "zero. Remove them first: `sc.pp.filter_cells(adata, min_counts=1)`."
        )
    empty_genes = summary.gene_totals == 0
    if empty_genes.any():
        logger.warning(
            "%d of %d genes have no counts in %s (for example %s). They are kept, as in "
            "scvi-tools (a query prepared with `prepare_query_anndata` has such genes by "
            "design); to drop them from a reference: `sc.pp.filter_genes(adata, min_counts=1)`.",
            int(empty_genes.sum()),
            adata.n_vars,
            where,
            list(adata.var_names[np.flatnonzero(empty_genes)[:3]]),
        )
    if not summary.is_integer:
        warnings.warn(
            f"{where} does not contain unnormalized count data: {summary.n_non_integer} values "
            f"are not integers (e.g. {summary.first_non_integer:.4g}). The count likelihoods "
            "('zinb', 'nb', 'poisson') expect raw counts: pass them with "
            "`setup_anndata(adata, layer='counts')`, or use gene_likelihood='normal' for "
            "log-normalised data. Ambient-corrected counts (e.g. CellBender) are fine.",
            UserWarning,
            stacklevel=3,
        )
    return summary


def check_model_data(n_obs: int) -> None:
    """Enough cells to build and train a model (not needed to embed cells with one)."""
    if n_obs < 3:
        raise InvalidInputError(
            f"Training needs at least 3 cells (the encoder's batch normalisation and "
            f"scvi-tools' data splitter drop mini-batches of fewer cells); got {n_obs}. To "
            "embed a few cells, train on a reference and map them with "
            "`QBMVAE.load_query_data` or `model.get_latent_representation(adata)`."
        )


def row_totals(matrix) -> np.ndarray:
    """Per-row sums of a dense, sparse or backed matrix, read in chunks."""
    n_rows, n_cols = matrix.shape
    totals = np.zeros(n_rows)
    for start, block in _row_chunks(matrix, n_rows, n_cols):
        totals[start : start + block.shape[0]] = np.asarray(block.sum(axis=1)).ravel()
    return totals
