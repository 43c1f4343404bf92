"""Matching the genes of an AnnData to a trained model's, by name."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
from anndata import AnnData

from scqbm._validation import InvalidInputError


def match_genes(model_var_names, adata: AnnData, what: str) -> None:
    """Make ``adata``'s genes those of the model, in the model's order.

    The same genes in another order are reordered in place, with a warning (scvi-tools warns
    and goes on with the genes misaligned); missing or extra genes are a clear error.
    """
    model_genes = pd.Index(np.asarray(model_var_names).astype(str))
    given = pd.Index(adata.var_names.astype(str))
    if model_genes.equals(given):
        return
    missing, extra = model_genes.difference(given), given.difference(model_genes)
    if len(missing) or len(extra) or given.has_duplicates:
        detail = (
            f"{len(missing)} of the model's genes are missing (e.g. {list(missing[:3])}), "
            f"{len(extra)} are new (e.g. {list(extra[:3])})"
            if len(missing) or len(extra)
            else "its gene names are not unique (`adata.var_names_make_unique()`)"
        )
        raise InvalidInputError(
            f"Genes of the AnnData passed to {what} do not match the model's: {detail}. "
            "Subset and order them first, e.g. `adata = adata[:, model_genes].copy()`, or use "
            "`QBMVAE.prepare_query_anndata(adata, reference)` which also pads missing genes "
            "with zeros."
        )
    if adata.isbacked or adata.is_view:
        raise InvalidInputError(
            f"The AnnData passed to {what} has the model's genes in another order and, being "
            f"{'backed' if adata.isbacked else 'a view'}, cannot be reordered in place. Pass "
            "`adata[:, model_genes].to_memory()` (backed) or `.copy()` (a view)."
        )
    warnings.warn(
        f"The AnnData passed to {what} has the model's genes in another order; reordering "
        "its variables in place to the model's order.",
        UserWarning,
        stacklevel=3,
    )
    # Positions of the model's genes in adata (names may be non-str in var_names).
    adata._inplace_subset_var(given.get_indexer(model_genes))
