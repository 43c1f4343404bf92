"""QBMVAE drives like scvi.model.SCVI (on scvi.data.synthetic_iid)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scvi
import torch
from anndata import AnnData

import scqbm
from scqbm import QBMVAE


@pytest.fixture
def adata():
    scvi.settings.seed = 0
    data = scvi.data.synthetic_iid(batch_size=200, n_genes=60, n_batches=2, n_labels=3)
    return data


@pytest.fixture
def trained(adata):
    QBMVAE.setup_anndata(adata, batch_key="batch", labels_key="labels")
    model = QBMVAE(adata, n_latent=12, n_hidden=32)
    model.train(max_epochs=3, batch_size=128, check_val_every_n_epoch=1, enable_progress_bar=False)
    return model


def test_same_calls_as_scvi(adata):
    # The same lines a scVI user writes, with one name changed.
    for cls in (scvi.model.SCVI, QBMVAE):
        data = adata.copy()
        cls.setup_anndata(data, batch_key="batch")
        model = cls(data, n_latent=10)
        model.train(max_epochs=1, enable_progress_bar=False)
        latent = model.get_latent_representation()
        assert latent.shape == (data.n_obs, 10)
        assert model.get_normalized_expression().shape == data.shape
        assert model.is_trained


def test_training_history_and_repr(trained, capsys):
    history = trained.history
    for key in (
        "elbo_train",
        "elbo_validation",
        "reconstruction_loss_train",
        "kl_local_train",
        "log_z",
        "log_z_stderr",
        "sampler_seconds",
        "sampler_fallbacks",
    ):
        assert key in history, key
    assert len(history["elbo_train"]) == 3 and len(history["log_z"]) == 3
    assert (history["sampler_fallbacks"].to_numpy(dtype=float) == 0).all()
    # The logged log Z is the real (exact) value, not the gradient surrogate.
    exact = trained.module.prior.log_partition_exact().item()
    assert trained.get_log_partition().value == pytest.approx(exact, abs=1e-4)
    print(trained)  # scvi prints the summary with rich, like SCVI
    text = capsys.readouterr().out
    assert "QBMVAE" in text and "prior: rbm" in text and "Training status: Trained" in text


def test_latent_representation_variants(trained, adata):
    mean = trained.get_latent_representation()
    assert mean.shape == (adata.n_obs, 12) and np.all((mean > 0) & (mean < 1))
    np.testing.assert_array_equal(mean, trained.get_latent_representation())  # deterministic
    binary = trained.get_latent_representation(give_mean=False, representation="binary")
    assert set(np.unique(binary)) <= {0.0, 1.0}
    # As in SCVI, give_mean=False is a posterior draw (binary by default), new on each call.
    draws = [trained.get_latent_representation(give_mean=False) for _ in range(2)]
    assert set(np.unique(draws[0])) <= {0.0, 1.0} and not np.array_equal(*draws)
    many = np.mean([trained.get_latent_representation(give_mean=False) for _ in range(50)], 0)
    assert np.abs(many - mean).max() < 5 * 0.5 / np.sqrt(50)
    relaxed_mean = trained.get_latent_representation(representation="relaxed")
    beta = trained.module.beta
    np.testing.assert_allclose(
        relaxed_mean, mean * (1 - 1 / beta + 1 / np.expm1(beta)), rtol=1e-5
    )  # spike-and-exponential: E[zeta] = q (1 - E[exp tail])
    with pytest.raises(ValueError, match="is the posterior mean"):
        trained.get_latent_representation(give_mean=False, representation="probabilities")
    relaxed = trained.get_latent_representation(give_mean=False, representation="relaxed")
    assert np.all((relaxed >= 0) & (relaxed <= 1))
    m, v = trained.get_latent_representation(return_dist=True)
    np.testing.assert_allclose(v, m * (1 - m), rtol=1e-6)
    subset = trained.get_latent_representation(indices=[0, 5, 7])
    np.testing.assert_allclose(subset, mean[[0, 5, 7]], rtol=1e-6)


def test_expression_de_and_predictive(trained, adata):
    expr = trained.get_normalized_expression(
        n_samples=3, transform_batch="batch_1", library_size=1e4
    )
    assert isinstance(expr, pd.DataFrame) and expr.shape == adata.shape
    np.testing.assert_allclose(expr.sum(1), 1e4, rtol=1e-3)
    latent_lib = trained.get_normalized_expression(library_size="latent", return_numpy=True)
    assert latent_lib.shape == adata.shape
    de = trained.differential_expression(groupby="labels", group1="label_0", group2="label_1")
    assert {"proba_m1", "proba_m2", "bayes_factor"} <= set(de.columns) and len(de) == adata.n_vars
    change = trained.differential_expression(groupby="labels", group1="label_0", mode="change")
    assert {"proba_de", "lfc_mean"} <= set(change.columns)
    sample = trained.posterior_predictive_sample(n_samples=2)
    assert sample.shape == (*adata.shape, 2)
    weighted = trained.get_normalized_expression(
        n_samples_overall=10, weights="importance", n_mc_samples=5
    )
    assert weighted.shape == (10, adata.n_vars)


def test_elbo_reconstruction_marginal_ll(trained):
    elbo = float(trained.get_elbo())
    rec = float(trained.get_reconstruction_error()["reconstruction_loss"])
    mll = trained.get_marginal_ll(n_mc_samples=20)
    assert np.isfinite([elbo, rec, mll]).all()
    # Importance sampling tightens the bound: log p(x) >= ELBO on average (ELBO is -loss).
    assert mll > elbo - 1.0


def test_energy_log_partition_prior_samples_and_generate(trained, adata):
    energy = trained.get_energy()
    assert energy.shape == (adata.n_obs,)
    probs = torch.as_tensor(trained.get_latent_representation())
    with torch.no_grad():
        expected = trained.module.prior.expected_energy(probs).numpy()
    np.testing.assert_allclose(energy, expected, rtol=1e-4, atol=1e-5)
    value, stderr = trained.get_log_partition("ais", n_chains=128, n_betas=200)
    assert value == pytest.approx(trained.get_log_partition().value, abs=5 * stderr + 0.05)
    h, W = trained.get_prior_parameters()
    assert h.shape == (12,) and W.shape == (12, 12) and np.allclose(W, W.T)
    samples = trained.sample_prior(64, burn_in=20, seed=0)
    assert samples.shape == (64, 12) and set(np.unique(samples)) <= {0.0, 1.0}
    state_before = trained.module.sampler.state.clone()
    generated = trained.generate(30, batch="batch_1", seed=0)
    assert isinstance(generated, AnnData) and generated.shape == (30, adata.n_vars)
    assert (generated.obs["batch"] == "batch_1").all()
    assert np.all(generated.X >= 0) and np.all(np.mod(generated.X, 1) == 0)
    assert torch.equal(trained.module.sampler.state, state_before)  # queries leave chains alone
    with pytest.raises(ValueError, match="Unknown batch"):
        trained.generate(3, batch="nope")


def test_sample_prior_matches_enumeration(trained):
    from scqbm.prior import exact_distribution

    with torch.no_grad():  # sharpen the learned prior so the check has something to see
        trained.module.prior.h.mul_(20.0)
        trained.module.prior.couplings.mul_(50.0)
    h, W = (torch.as_tensor(a, dtype=torch.float64) for a in trained.get_prior_parameters())
    states, probs = exact_distribution(h, W)
    marginals = (probs @ states).numpy()
    samples = trained.sample_prior(20_000, burn_in=200, seed=1)
    se = np.sqrt(marginals * (1 - marginals) / samples.shape[0])
    assert np.all(np.abs(samples.mean(0) - marginals) < 5 * se + 1e-3)


def test_save_load_round_trip(trained, adata, tmp_path):
    latent = trained.get_latent_representation()
    trained.save(tmp_path / "model", save_anndata=True)
    with_data = QBMVAE.load(tmp_path / "model")
    np.testing.assert_array_equal(with_data.get_latent_representation(), latent)
    assert torch.equal(with_data.module.sampler.state, trained.module.sampler.state)
    assert with_data.module.prior.log_z.item() == trained.module.prior.log_z.item()
    without_data = QBMVAE.load(tmp_path / "model", adata=adata)
    np.testing.assert_array_equal(without_data.get_latent_representation(), latent)
    # Training continues from the restored chains.
    without_data.train(max_epochs=1, enable_progress_bar=False)


def test_view_anndata_setup_and_print(trained, capsys):
    trained.view_anndata_setup()
    out = capsys.readouterr().out
    assert "batch" in out


def test_scarches_query_mapping(trained, adata):
    query = scvi.data.synthetic_iid(batch_size=100, n_genes=60, n_batches=1, n_labels=3)
    query.obs["batch"] = "query_batch"
    query.var_names = adata.var_names
    QBMVAE.prepare_query_anndata(query, trained)
    mapped = QBMVAE.load_query_data(query, trained)
    prior_before = [p.detach().clone() for p in mapped.module.prior.parameters()]
    assert not any(p.requires_grad for p in mapped.module.prior.parameters())
    mapped.train(max_epochs=2, plan_kwargs={"weight_decay": 0.0}, enable_progress_bar=False)
    for before, after in zip(prior_before, mapped.module.prior.parameters(), strict=True):
        assert torch.equal(before, after)
    latent = mapped.get_latent_representation()
    assert latent.shape == (query.n_obs, 12)
    # The decoder of the reference is frozen.
    assert not any(
        p.requires_grad for n, p in mapped.module.decoder.named_parameters() if "Layer 1" in n
    )


def test_tl_integrate_writes_only_results(adata):
    before_obs = list(adata.obs.columns)
    before_uns = set(adata.uns)
    model = scqbm.tl.integrate(
        adata, batch_key="batch", max_epochs=2, model_kwargs={"n_latent": 8}
    )
    assert adata.obsm["X_qbmvae"].shape == (adata.n_obs, 8)
    assert list(adata.obs.columns) == [*before_obs, "qbmvae_energy"]
    assert set(adata.uns) - before_uns == {"qbmvae"}
    assert model.adata is not adata


@pytest.mark.parametrize("likelihood", ["nb", "poisson", "normal"])
@pytest.mark.parametrize("prior", ["bm"])
def test_other_likelihoods_and_dense_prior(adata, likelihood, prior):
    data = adata.copy()
    if likelihood == "normal":
        data.X = np.log1p(data.X / data.X.sum(1, keepdims=True) * 1e4)
    QBMVAE.setup_anndata(data, batch_key="batch")
    model = QBMVAE(
        data, n_latent=6, gene_likelihood=likelihood, prior=prior, relaxation="overlapping_exp"
    )
    model.train(max_epochs=2, enable_progress_bar=False)
    assert np.isfinite(model.history["elbo_train"].to_numpy(dtype=float)).all()
    assert model.get_latent_representation().shape == (data.n_obs, 6)


def test_learned_library_size_and_ais_log_partition(adata):
    QBMVAE.setup_anndata(adata, batch_key="batch")
    model = QBMVAE(
        adata,
        n_latent=24,
        prior="bm",
        use_observed_lib_size=False,
        ais_kwargs={"n_chains": 64, "n_betas": 50},
    )
    assert not model.module.exact_log_partition
    model.train(max_epochs=2, enable_progress_bar=False)
    estimate = model.get_log_partition()
    assert estimate.method == "ais" and estimate.stderr > 0
    assert np.isfinite(model.get_marginal_ll(n_mc_samples=5))
