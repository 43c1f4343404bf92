"""Importance weights with the Boltzmann prior, against brute force on a 4-unit latent."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest
import scvi
import torch

from scqbm import QBMVAE
from scqbm.model._importance import draw_posterior
from scqbm.nn import make_relaxation

N_LATENT = 4


@pytest.fixture(scope="module")
def trained():
    scvi.settings.seed = 0
    adata = scvi.data.synthetic_iid(batch_size=60, n_genes=12, n_batches=1, n_labels=2)
    QBMVAE.setup_anndata(adata, labels_key="labels")
    model = QBMVAE(adata, n_latent=N_LATENT, n_hidden=16, prior="bm")
    model.train(max_epochs=15, batch_size=30, enable_progress_bar=False)
    # A prior far from uniform, which the encoder has not seen: the weights must correct it.
    prior = model.module.prior
    with torch.no_grad():
        prior.h.copy_(torch.tensor([2.0, -1.5, 1.0, -2.0]))
        prior.couplings.mul_(4.0)
    model.module.refresh_log_partition()
    return model, adata


def _energy(states: np.ndarray, h: np.ndarray, W: np.ndarray) -> np.ndarray:
    # E(z) = -h.z - z'Wz (W symmetric, zero diagonal), written out independently.
    return -states @ h - np.einsum("si,ij,sj->s", states, W, states)


def _prior_log_probs(model):
    h, W = (a.astype(np.float64) for a in model.get_prior_parameters())
    states = np.array(list(itertools.product([0.0, 1.0], repeat=N_LATENT)))
    log_unnormalised = -_energy(states, h, W)
    log_z = np.logaddexp.reduce(log_unnormalised)
    return states, log_unnormalised - log_z, h, W, log_z


def test_single_anchor_weights_are_prior_times_likelihood_over_posterior(trained):
    model, adata = trained
    scvi.settings.seed = 1
    cell = np.array([3])
    draws = draw_posterior(model, adata, cell, n_samples=64)
    weights = model.get_importance_weights(adata, cell, px=draws.px, zs=draws.z, n_mc_samples=8)
    _, _, h, W, log_z = _prior_log_probs(model)
    z = draws.z.reshape(-1, N_LATENT).numpy().astype(np.float64)
    q = model.get_latent_representation(adata[cell].copy()).astype(np.float64)[0]
    log_q = (z * np.log(q) + (1 - z) * np.log1p(-q)).sum(1)
    x = torch.as_tensor(adata.X[cell], dtype=torch.float32)
    log_px_zeta = draws.px[0].log_prob(x).sum(-1).reshape(-1).double().numpy()
    # With one anchor, p(x_m) cancels: w_s ∝ p(z_s) p(x | zeta_s) / q(z_s | x).
    log_w = -_energy(z, h, W) - log_z + log_px_zeta - log_q
    expected = np.exp(log_w - np.logaddexp.reduce(log_w))
    np.testing.assert_allclose(weights, expected, rtol=1e-4, atol=1e-9)
    assert weights.std() > 0  # not uniform: the prior differs from the posterior


def test_weighted_draws_follow_the_group_posterior_by_enumeration(trained):
    model, adata = trained
    scvi.settings.seed = 2
    module = model.module
    group = np.arange(5)
    draws = draw_posterior(model, adata, group, n_samples=3000)
    weights = model.get_importance_weights(
        adata, group, px=draws.px, zs=draws.z, n_mc_samples=2000, n_mc_samples_per_pass=500
    )
    z = draws.z.reshape(-1, N_LATENT).numpy()
    estimate = weights @ z
    ess = 1.0 / np.sum(weights**2)

    # Brute force: all 16 codes z; zeta ~ r(zeta | z) integrated by Monte Carlo.
    states, log_pz, *_ = _prior_log_probs(model)
    relaxation = make_relaxation(module.relaxation, torch.zeros(1), module.beta)
    n_zeta = 4000
    log_lik = np.zeros((len(group), len(states)))  # log E_r[p(x_m | zeta)]
    with torch.no_grad():
        for j, state in enumerate(states):
            codes = torch.as_tensor(state, dtype=torch.float32).expand(n_zeta, N_LATENT)
            zeta = relaxation.sample_conditional(codes)
            for m, cell in enumerate(group):
                x = torch.as_tensor(adata.X[[cell]], dtype=torch.float32)
                px = module.generative(
                    z=zeta,
                    library=torch.log(x.sum()).expand(n_zeta, 1),
                    batch_index=torch.zeros(n_zeta, 1, dtype=torch.long),
                    y=torch.zeros(n_zeta, 1, dtype=torch.long),
                )["px"]
                log_p = px.log_prob(x.expand(n_zeta, -1)).sum(-1).double()
                log_lik[m, j] = float(torch.logsumexp(log_p, 0) - np.log(n_zeta))
    log_joint = log_pz[None, :] + log_lik
    log_px = np.logaddexp.reduce(log_joint, axis=1)
    group_posterior = np.exp(log_joint - log_px[:, None]).mean(0)
    exact = group_posterior @ states

    assert ess > 500
    np.testing.assert_allclose(estimate, exact, atol=4 / np.sqrt(ess) + 0.02)
    # The marginal likelihoods the weights used agree with enumeration.
    mll = np.asarray(
        model.get_marginal_ll(adata, indices=group, return_mean=False, n_mc_samples=2000)
    )
    np.testing.assert_allclose(mll.ravel(), log_px, atol=0.1)


def test_importance_weighted_expression_and_de(trained):
    model, adata = trained
    scvi.settings.seed = 3
    expr = model.get_normalized_expression(
        indices=np.arange(20), n_samples_overall=40, weights="importance", n_mc_samples=20
    )
    assert isinstance(expr, pd.DataFrame) and expr.shape == (40, adata.n_vars)
    np.testing.assert_allclose(expr.sum(1), 1.0, rtol=1e-4)
    numpy_expr = model.get_normalized_expression(
        n_samples_overall=30,
        weights="importance",
        return_numpy=True,
        library_size=1e4,
        gene_list=list(adata.var_names[:5]),
        n_mc_samples=10,
    )
    assert numpy_expr.shape == (30, 5)
    de = model.differential_expression(
        groupby="labels",
        group1="label_0",
        weights="importance",
        importance_weighting_kwargs={"n_mc_samples": 10, "max_cells": 16},
    )
    assert {"proba_m1", "bayes_factor"} <= set(de.columns) and len(de) == adata.n_vars
    assert np.isfinite(de["bayes_factor"]).all()
