"""Refuse scvi-tools' ``from_scvi_model`` initialisers on a QBMVAE, at once and by name.

``scvi.model.SCANVI.from_scvi_model`` (and the initialisers modelled on it, such as
``TOTALANVI``'s and external packages') assume an SCVI with a Gaussian latent. Given a QBMVAE,
they used to fail deep inside, after registering the AnnData anew (``'QBMVAE' object has no
attribute 'minified_data_type'``, or ``VAE.__init__() got an unexpected keyword argument
'prior'``). The first thing each of them does is
``scvi_model._check_if_trained(message=FROM_SCVI_MESSAGE)``: that call, recognised by its
message, is the hook; it runs before anything is read from or written to the model or the
AnnData. A contract test (``tests/test_qbmscanvi.py``) fails if scvi-tools changes the call.
"""

from __future__ import annotations

# The message scvi-tools' initialisers pass (scvi/model/_scanvi.py, external/totalanvi).
FROM_SCVI_MESSAGE = "Passed in scvi model hasn't been trained yet."


class NotAnSCVIModelError(TypeError):
    """An scvi-tools initialiser that needs an SCVI model was given a QBMVAE."""


def refuse_scvi_initialiser(model, message: str) -> None:
    """Raise :class:`NotAnSCVIModelError` if ``message`` is the initialisers' message."""
    if message != FROM_SCVI_MESSAGE:
        return
    raise NotAnSCVIModelError(
        f"scvi-tools' `from_scvi_model` initialisers (e.g. scvi.model.SCANVI.from_scvi_model) "
        f"need an scvi.model.SCVI with a Gaussian latent, not a {type(model).__name__} (binary "
        "latents with a Boltzmann prior). For the scANVI workflow on a QBMVAE use "
        "`scqbm.QBMSCANVI.from_qbmvae_model(model, unlabeled_category=..., labels_key=...)`. "
        "Nothing was changed on the model or its AnnData."
    )
