"""Encoder of factorial Bernoulli posteriors q(z | x) over binary latents."""

from __future__ import annotations

import torch
from torch import nn

from ._relaxations import make_relaxation


class BernoulliEncoder(nn.Module):
    """Maps ``x`` (and covariates) to Bernoulli logits and a relaxed sample of the latent.

    It wraps the ``FCLayers`` trunk of an scvi ``Encoder`` under the same attribute name
    (``encoder``), so scArches' parameter freezing treats it like SCVI's ``z_encoder``.

    Parameters
    ----------
    fc_layers
        The hidden network (:class:`scvi.nn.FCLayers`), covariate injection included.
    n_hidden
        Width of its last layer.
    n_output
        Number of binary latent units.
    relaxation, beta
        Smoothing of the binary bottleneck (see :mod:`scqbm.nn`).

    """

    def __init__(
        self, fc_layers: nn.Module, n_hidden: int, n_output: int, relaxation: str, beta: float
    ):
        super().__init__()
        self.encoder = fc_layers
        self.logit_encoder = nn.Linear(n_hidden, n_output)
        self.relaxation = relaxation
        self.beta = beta
        make_relaxation(relaxation, torch.zeros(1), beta)  # validate the names early

    def z_transformation(self, z: torch.Tensor) -> torch.Tensor:
        # scvi's VAE applies this to extra samples; the relaxation already lives in [0, 1].
        return z

    def forward(self, x: torch.Tensor, *cat_list: torch.Tensor):
        """Return the relaxed posterior (Distribution-like) and one reparameterised sample."""
        logits = self.logit_encoder(self.encoder(x, *cat_list))
        qz = make_relaxation(self.relaxation, logits, self.beta)
        return qz, qz.rsample()
