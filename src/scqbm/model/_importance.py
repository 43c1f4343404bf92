"""Importance weights of posterior samples under the Boltzmann prior (scVI's, re-derived).

scVI reweights posterior samples so that they follow the posterior of a *group* of cells,
``p(h | group) = (1/M) sum_m p(h | x_m)``, using the mixture of encoder posteriors as the
proposal (Boyeau et al. 2023). Here the latent is ``h = (z, zeta)``: binary ``z`` with the
Boltzmann prior ``p(z) = exp(-E(z)) / Z`` and the relaxed ``zeta ~ r(zeta | z)`` the decoder
sees. With the proposal ``(1/M) sum_m q(z | x_m) r(zeta | z)`` the factor ``r(zeta | z)``
cancels, leaving for a sample ``(z_s, zeta_s)``::

    w_s ∝ p(z_s) sum_m [p(x_m | zeta_s) / p(x_m)] / sum_m q(z_s | x_m)

with ``log p(z) = -E(z) - log Z`` in place of scVI's ``log N(z; 0, I)``, ``log q(z | x_m)``
the Bernoulli log-probability of ``z_s`` under cell ``m``'s logits, and ``log p(x_m)`` the
importance-sampled marginal likelihood (:meth:`~scqbm.module.QBMVAEModule.marginal_ll`). As
in scvi-tools, ``p(x_m | zeta_s)`` rescales the sample's expression to cell ``m``'s observed
library size, and at most ``max_cells`` anchor cells are used.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scvi import REGISTRY_KEYS
from scvi.distributions import NegativeBinomial, Poisson, ZeroInflatedNegativeBinomial

from scqbm._compat import MODULE_KEYS


def torch_seeded_rng() -> np.random.Generator:
    """A numpy generator drawn from torch's (so ``scvi.settings.seed`` makes it repeatable)."""
    return np.random.default_rng(int(torch.randint(0, 2**62, ()).item()))


@dataclass
class PosteriorDraws:
    """``n_samples`` draws per cell: binary codes, decoder distributions, expression."""

    z: torch.Tensor  # (n_samples, n_cells, n_latent), binary
    px: list  # decoder distributions per mini-batch, each over (n_samples, batch, n_genes)
    expression: np.ndarray  # (n_samples, n_cells, n_genes_selected)


@torch.inference_mode()
def draw_posterior(
    model,
    adata,
    indices: np.ndarray,
    n_samples: int,
    transform_batch=None,
    library_size: float | str = 1,
    gene_mask=slice(None),
    batch_size: int | None = None,
    **data_loader_kwargs,
) -> PosteriorDraws:
    """Draw ``z ~ q(z|x)``, ``zeta ~ r(zeta|z)`` and decode, for every cell in ``indices``."""
    module = model.module
    key, scaling = ("mu", 1.0) if library_size == "latent" else ("scale", library_size)
    loader = model._make_data_loader(
        adata=adata, indices=indices, batch_size=batch_size, **data_loader_kwargs
    )
    codes, dists, expressions = [], [], []
    for tensors in loader:
        outputs = module.inference(**module._get_inference_input(tensors))
        qz = outputs[MODULE_KEYS.QZ_KEY]
        probs = qz.probs
        z = torch.bernoulli(probs.expand((n_samples, *probs.shape)))
        generative_inputs = module._get_generative_input(tensors, outputs)
        generative_inputs[MODULE_KEYS.Z_KEY] = qz.sample_conditional(z)
        px = module.generative(**generative_inputs, transform_batch=transform_batch)[
            MODULE_KEYS.PX_KEY
        ]
        expressions.append((px.get_normalized(key)[..., gene_mask] * scaling).cpu())
        codes.append(z.cpu())
        dists.append(px)
    return PosteriorDraws(torch.cat(codes, dim=1), dists, torch.cat(expressions, dim=1).numpy())


def _rescaled_log_prob(px, x: torch.Tensor) -> torch.Tensor:
    """``log p(x | zeta)`` with the decoder's expression scaled to ``x``'s library size."""
    library = x.sum(-1, keepdim=True)
    if isinstance(px, ZeroInflatedNegativeBinomial):
        px = ZeroInflatedNegativeBinomial(
            mu=px.scale * library, theta=px.theta, zi_logits=px.zi_logits, scale=px.scale
        )
    elif isinstance(px, NegativeBinomial):
        px = NegativeBinomial(mu=px.scale * library, theta=px.theta, scale=px.scale)
    elif isinstance(px, Poisson):
        px = Poisson(rate=px.scale * library, scale=px.scale)
    # "normal" (log-normalised data) has no library size.
    return px.log_prob(x).sum(-1)


def group_log_weights(
    log_pz: torch.Tensor,
    log_px_z: torch.Tensor,
    log_px: torch.Tensor,
    log_qz: torch.Tensor,
    truncation: bool = False,
) -> torch.Tensor:
    """Normalised log weights of samples for the group posterior (see the module docstring).

    Parameters
    ----------
    log_pz
        ``(S,)`` prior log-probability of each sample's binary code.
    log_px_z
        ``(S, M)`` ``log p(x_m | zeta_s)`` for each sample and anchor cell.
    log_px
        ``(M,)`` ``log p(x_m)`` of the anchors.
    log_qz
        ``(S, M)`` ``log q(z_s | x_m)``.
    truncation
        Truncate the weights from below at their mean, as scvi-tools does (Ionides 2008).

    """
    log_w = torch.logsumexp(
        log_pz[:, None] + log_px_z - log_px[None, :] - torch.logsumexp(log_qz, 1, keepdim=True),
        dim=1,
    )
    if truncation:
        tau = torch.logsumexp(log_w, 0) - np.log(log_w.shape[0])
        log_w = torch.clamp(log_w, min=tau)
    return log_w - torch.logsumexp(log_w, 0)


@torch.inference_mode()
def importance_weights(
    model,
    adata,
    indices: np.ndarray,
    px: list,
    zs: torch.Tensor,
    max_cells: int = 1024,
    truncation: bool = False,
    n_mc_samples: int = 500,
    n_mc_samples_per_pass: int = 250,
    **data_loader_kwargs,
) -> np.ndarray:
    """Weights (summing to 1) of the samples ``zs`` flattened over ``(n_samples, n_cells)``."""
    module = model.module
    indices = np.asarray(indices)
    anchors = (
        torch_seeded_rng().choice(len(indices), size=max_cells, replace=False)
        if len(indices) > max_cells
        else np.arange(len(indices))
    )
    anchor_indices = indices[anchors]
    log_px = torch.as_tensor(
        np.asarray(
            model.get_marginal_ll(
                adata,
                indices=anchor_indices,
                return_mean=False,
                n_mc_samples=n_mc_samples,
                n_mc_samples_per_pass=n_mc_samples_per_pass,
            )
        ),
        dtype=torch.float64,
    ).reshape(-1)
    n_latent = zs.shape[-1]
    z = zs.reshape(-1, n_latent).to(torch.float64)
    prior = module.prior
    log_pz = (-prior.energy(z.to(prior.h), prior.coupling_matrix())).double().cpu()
    log_pz = log_pz - float(module.prior.current_log_z())
    log_qz, log_px_z = [], []
    loader = model._make_data_loader(adata=adata, indices=anchor_indices, **data_loader_kwargs)
    for tensors in loader:
        logits = (
            module.inference(**module._get_inference_input(tensors))[MODULE_KEYS.QZ_KEY]
            .logits.double()
            .cpu()
        )
        # log q(z | x_m) = z . l_m - sum softplus(l_m) for a factorial Bernoulli.
        log_qz.append(z @ logits.T - torch.nn.functional.softplus(logits).sum(-1))
        x = tensors[REGISTRY_KEYS.X_KEY].to(module.device)
        for x_m in x:
            per_sample = [_rescaled_log_prob(dist, x_m[None, :]) for dist in px]
            log_px_z.append(torch.cat(per_sample, dim=-1).reshape(-1).double().cpu())
    log_w = group_log_weights(
        log_pz, torch.stack(log_px_z, dim=1), log_px, torch.cat(log_qz, dim=1), truncation
    )
    weights = log_w.exp().numpy()
    return weights / weights.sum()
