"""AnnData bookkeeping of the model layer: undoing a setup, library statistics."""

from __future__ import annotations

import logging
import weakref

import numpy as np
from anndata import AnnData
from scvi import REGISTRY_KEYS

from scqbm._compat import MANAGER_UUID_KEY, SCVI_KEY_PREFIX, SCVI_UUID_KEY, SETUP_ARGS_KEY
from scqbm._validation import row_totals

# What scvi-tools' setup_anndata writes into an AnnData (1.4 and 1.5).
_SCVI_PREFIX = SCVI_KEY_PREFIX
_UNS_KEYS = (SCVI_UUID_KEY, MANAGER_UUID_KEY)
# State before each setup, by the manager uuid that setup wrote (small: names and two ids).
_SNAPSHOTS: dict[str, dict] = {}
# Setups undone after a failed model construction, by id(adata): (weak reference, setup args),
# so that the user's next `QBMVAE(adata, ...)` works without calling setup_anndata again.
_UNDONE: dict[int, tuple[weakref.ref, dict]] = {}

logger = logging.getLogger(__name__)


def setup_snapshot(adata: AnnData) -> dict:
    """The scvi-tools entries of ``adata`` before a setup, to restore them if a model fails."""
    return {
        "obs": {k for k in adata.obs.columns if str(k).startswith(_SCVI_PREFIX)},
        "obsm": {k for k in adata.obsm.keys() if str(k).startswith(_SCVI_PREFIX)},
        "uns": {k: adata.uns[k] for k in _UNS_KEYS if k in adata.uns},
    }


def restore_setup(adata: AnnData, snapshot: dict) -> None:
    """Remove the scvi-tools entries written since ``snapshot`` and restore its ids."""

    def added(keys, before):
        return [k for k in keys if str(k).startswith(_SCVI_PREFIX) and k not in before]

    added_obs = added(adata.obs.columns, snapshot["obs"])
    if added_obs:
        adata.obs.drop(columns=added_obs, inplace=True)
    added_obsm = added(list(adata.obsm.keys()), snapshot["obsm"])
    for key in added_obsm:
        del adata.obsm[key]
    for key in _UNS_KEYS:
        if key in snapshot["uns"]:
            adata.uns[key] = snapshot["uns"][key]
        else:
            adata.uns.pop(key, None)


def remember_setup(adata: AnnData, snapshot: dict) -> None:
    """Keep ``snapshot`` for the setup that was just written into ``adata``."""
    _SNAPSHOTS[adata.uns[MANAGER_UUID_KEY]] = snapshot


def undo_setup(model_cls, adata: AnnData) -> bool:
    """Remove what the last ``setup_anndata`` wrote into ``adata`` and forget its manager.

    Returns whether there was anything to undo.
    """
    uuid = adata.uns.get(SCVI_UUID_KEY)
    snapshot = _SNAPSHOTS.pop(adata.uns.get(MANAGER_UUID_KEY), None)
    if snapshot is None:  # not set up by us: nothing of ours to undo
        return False
    manager = model_cls._setup_adata_manager_store.get(uuid)
    restore_setup(adata, snapshot)
    if SCVI_UUID_KEY not in snapshot["uns"]:
        model_cls._setup_adata_manager_store.pop(uuid, None)
        if manager is not None:
            setup_args = dict(manager.registry.get(SETUP_ARGS_KEY, {}))
            _UNDONE[id(adata)] = (weakref.ref(adata), setup_args)
    return True


def redo_undone_setup(model_cls, adata: AnnData) -> None:
    """Set ``adata`` up again as it was before a failed model construction undid it."""
    entry = _UNDONE.pop(id(adata), None)
    if entry is None or entry[0]() is not adata or SCVI_UUID_KEY in adata.uns:
        return
    logger.info("Setting the AnnData up again with %s (undone after the last error).", entry[1])
    model_cls.setup_anndata(adata, **entry[1])


def library_log_stats(adata_manager, n_batch: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean and variance of log library size per batch, ``(1, n_batch)`` each.

    As scvi's ``_init_library_size`` (mean 0, variance 1 for an absent batch), but read in
    chunks (backed data) and correct for a single cell.
    """
    totals = row_totals(adata_manager.get_from_registry(REGISTRY_KEYS.X_KEY))
    batches = np.asarray(adata_manager.get_from_registry(REGISTRY_KEYS.BATCH_KEY)).ravel()
    means, variances = np.zeros(n_batch), np.ones(n_batch)
    with np.errstate(divide="ignore"):
        log_totals = np.where(totals > 0, np.log(np.maximum(totals, 1e-300)), 0.0)
    for code in np.unique(batches):
        values = log_totals[batches == code]
        means[int(code)] = values.mean()
        variances[int(code)] = values.var()
    return means.reshape(1, -1), variances.reshape(1, -1)
