"""Scanpy-style functions: take an AnnData, write results into it, return the model."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np
from anndata import AnnData

from scqbm._validation import check_obs_keys, get_layer

if TYPE_CHECKING:
    from scqbm.model import QBMVAE

logger = logging.getLogger(__name__)


def _working_view(adata: AnnData, layer: str | None, obs_keys: list[str]) -> AnnData:
    """A light AnnData sharing the expression matrix, with only the obs columns needed.

    Registration writes bookkeeping (``uns``, ``obs`` codes) into the AnnData it is given; doing
    it on this object leaves the user's AnnData untouched until the results are written.
    """
    matrix = get_layer(adata, layer)
    return AnnData(
        X=matrix,
        obs=adata.obs[obs_keys].copy(),
        var=adata.var[[]].copy(),
    )


def integrate(
    adata: AnnData,
    batch_key: str | None = None,
    layer: str | None = None,
    labels_key: str | None = None,
    categorical_covariate_keys: list[str] | None = None,
    continuous_covariate_keys: list[str] | None = None,
    key_added: str = "X_qbmvae",
    energy_key: str = "qbmvae_energy",
    max_epochs: int | None = None,
    seed: int | None = 0,
    model_kwargs: dict | None = None,
    train_kwargs: dict | None = None,
) -> QBMVAE:
    """Train a :class:`~scqbm.QBMVAE` and write its embedding into ``adata``.

    Parameters
    ----------
    adata
        Cells x genes; raw counts in ``adata.X`` or in ``layer``.
    batch_key, layer, labels_key, categorical_covariate_keys, continuous_covariate_keys
        As in :meth:`scqbm.QBMVAE.setup_anndata`.
    key_added
        ``adata.obsm`` key of the embedding (posterior probabilities of the binary latent).
    energy_key
        ``adata.obs`` key of the per-cell prior energy.
    max_epochs
        Training epochs (``None``: scvi's heuristic from the number of cells).
    seed
        Random seed (``scvi.settings.seed``); ``None`` leaves it as it is.
    model_kwargs, train_kwargs
        Passed to :class:`~scqbm.QBMVAE` and :meth:`~scqbm.QBMVAE.train`.

    Returns
    -------
    The trained model. It holds its own light AnnData (sharing the expression matrix); ``adata``
    itself is changed only at the end, and only in ``obsm[key_added]``, ``obs[energy_key]`` and
    ``uns["qbmvae"]``, so a failure leaves it as it was.

    Examples
    --------
    >>> import scanpy as sc, scqbm
    >>> adata = scqbm.datasets.kang_ifnb()
    >>> model = scqbm.tl.integrate(adata, batch_key="stim", max_epochs=20)
    >>> sc.pp.neighbors(adata, use_rep="X_qbmvae")
    >>> sc.tl.umap(adata)

    """
    import scvi

    from scqbm.model import QBMVAE

    keys = {
        "batch_key": batch_key,
        "labels_key": labels_key,
        "categorical_covariate_keys": categorical_covariate_keys,
        "continuous_covariate_keys": continuous_covariate_keys,
    }
    check_obs_keys(adata, **keys)
    obs_keys = []
    for value in keys.values():
        if value is not None:
            obs_keys.extend([value] if isinstance(value, str) else value)
    work = _working_view(adata, layer, list(dict.fromkeys(obs_keys)))
    if seed is not None:
        scvi.settings.seed = seed
    QBMVAE.setup_anndata(work, **keys)
    model = QBMVAE(work, **(model_kwargs or {}))
    model.train(max_epochs=max_epochs, **(train_kwargs or {}))
    embedding = model.get_latent_representation()
    energy = model.get_energy()
    log_z = model.get_log_partition()
    adata.obsm[key_added] = embedding.astype(np.float32)
    adata.obs[energy_key] = energy
    adata.uns["qbmvae"] = {
        "key_added": key_added,
        "energy_key": energy_key,
        "log_partition": log_z.value,
        "log_partition_stderr": log_z.stderr,
        "log_partition_method": log_z.method,
        "params": {
            k: v for k, v in model._module_kwargs.items() if isinstance(v, (int, float, str))
        },
    }
    return model
