"""Minified AnnData for QBMVAE: counts dropped, the encoder's Bernoulli logits kept.

The posterior ``q(z|x)`` is a factorial Bernoulli, so one array of logits per cell determines
it (scVI stores a Gaussian's mean and variance). Both of scvi-tools' posterior registry keys
point at that one array; the module's cached inference reads the logits and ignores the
second copy.
"""

from __future__ import annotations

import numpy as np
import torch
from scvi import REGISTRY_KEYS
from scvi.model.utils import get_minified_adata_scrna

from scqbm._compat import ADATA_MINIFY_TYPE, ADATA_MINIFY_TYPE_UNS_KEY, SCVI_UUID_KEY
from scqbm._validation import row_totals

#: obsm key of the stored logits in a minified AnnData.
LOGITS_KEY = "qbmvae_latent_logits"


@torch.inference_mode()
def posterior_logits(model) -> np.ndarray:
    """Encoder logits ``log q - log(1 - q)`` of every cell of the model's AnnData."""
    chunks = [outputs["qz"].logits.cpu() for outputs in model._posterior_outputs(None, None, None)]
    return torch.cat(chunks).numpy().astype(np.float32)


def minify(model, minified_data_type: str, use_latent_qzm_key: str | None) -> None:
    """Replace ``model.adata`` by its minified copy (see :meth:`QBMVAE.minify_adata`)."""
    if minified_data_type not in ADATA_MINIFY_TYPE:
        raise NotImplementedError(
            f"Minification method {minified_data_type!r} is not supported; use one of "
            f"{list(ADATA_MINIFY_TYPE)}."
        )
    if not model.module.use_observed_lib_size:
        raise ValueError(
            "Minification needs the observed library size: the model was built with "
            "use_observed_lib_size=False."
        )
    if model.minified_data_type is not None:
        raise ValueError("The model's AnnData is already minified.")
    logits = posterior_logits(model)
    stored = model.adata.obsm.get(use_latent_qzm_key) if use_latent_qzm_key else None
    if stored is not None and not np.allclose(
        np.asarray(stored), 1 / (1 + np.exp(-logits.astype(np.float64))), atol=1e-4
    ):
        raise ValueError(
            f"adata.obsm[{use_latent_qzm_key!r}] is not this model's posterior mean q(z=1|x) "
            "(from `get_latent_representation(return_dist=True)`); QBMVAE stores the "
            "encoder's logits itself, so remove it or pass `use_latent_qzm_key=None`."
        )
    counts = model.adata_manager.get_from_registry(REGISTRY_KEYS.X_KEY)
    mini = get_minified_adata_scrna(
        adata_manager=model.adata_manager,
        keep_count_data=minified_data_type == ADATA_MINIFY_TYPE.LATENT_POSTERIOR_WITH_COUNTS,
    )
    del mini.uns[SCVI_UUID_KEY]
    mini.uns[ADATA_MINIFY_TYPE_UNS_KEY] = minified_data_type
    mini.obsm[LOGITS_KEY] = logits
    mini.obs[model._OBSERVED_LIB_SIZE_KEY] = row_totals(counts)
    model._update_adata_and_manager_post_minification(mini, minified_data_type)
    model.module.minified_data_type = minified_data_type
