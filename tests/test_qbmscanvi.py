"""QBMSCANVI: scANVI's workflow from a trained QBMVAE, and SCANVI.from_scvi_model refusing it."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scvi
import torch

import scqbm
from scqbm.model import NotAnSCVIModelError

N_TYPES = 3
UNKNOWN = "Unknown"


def separable_adata(n_cells: int = 400, n_genes: int = 40, seed: int = 0) -> ad.AnnData:
    """Counts of three types with distinct gene programmes; batch 'b' is unlabelled."""
    rng = np.random.default_rng(seed)
    types = rng.integers(N_TYPES, size=n_cells)
    means = np.full((N_TYPES, n_genes), 1.0)
    for t in range(N_TYPES):  # each type expresses its own block of genes highly
        means[t, t * (n_genes // N_TYPES) : (t + 1) * (n_genes // N_TYPES)] = 12.0
    adata = ad.AnnData(rng.poisson(means[types]).astype(np.float32))
    adata.obs_names = [f"cell{i}" for i in range(n_cells)]
    adata.var_names = [f"gene{j}" for j in range(n_genes)]
    adata.obs["batch"] = np.where(rng.random(n_cells) < 0.5, "a", "b")
    adata.obs["cell_type"] = [f"type{t}" for t in types]
    labels = adata.obs["cell_type"].to_numpy().copy()
    labels[adata.obs["batch"].to_numpy() == "b"] = UNKNOWN
    adata.obs["labels"] = labels
    return adata


@pytest.fixture(scope="module")
def qbmvae():
    scvi.settings.seed = 0
    adata = separable_adata()
    scqbm.QBMVAE.setup_anndata(adata, batch_key="batch")
    model = scqbm.QBMVAE(adata, n_latent=8, n_hidden=32)
    model.train(max_epochs=3, batch_size=64, enable_progress_bar=False)
    return model


@pytest.fixture(scope="module")
def trained(qbmvae):
    scvi.settings.seed = 0
    model = scqbm.QBMSCANVI.from_qbmvae_model(
        qbmvae, unlabeled_category=UNKNOWN, labels_key="labels"
    )
    prior_before = model.module.prior.h.detach().clone()
    model.train(max_epochs=8, batch_size=64, enable_progress_bar=False)
    return model, prior_before


def test_from_qbmvae_copies_the_trained_weights(qbmvae):
    model = scqbm.QBMSCANVI.from_qbmvae_model(
        qbmvae, unlabeled_category=UNKNOWN, labels_key="labels"
    )
    assert model.was_pretrained and not model.is_trained
    source = qbmvae.module.state_dict()
    target = model.module.state_dict()
    for key, value in source.items():  # encoder, decoder, prior, chains, log Z
        torch.testing.assert_close(target[key], value, equal_nan=True)
    assert {k for k in target if k not in source} == {
        k for k in target if k.startswith("classifier.")
    }
    assert model.n_labels == N_TYPES
    assert model.unlabeled_category_ == UNKNOWN
    # the same architecture as the QBMVAE
    assert model.init_params_["non_kwargs"]["n_latent"] == 8


def test_train_predict_and_latent(trained):
    model, prior_before = trained
    adata = model.adata
    hard = model.predict()
    assert hard.shape == (adata.n_obs,)
    assert set(hard) <= {f"type{t}" for t in range(N_TYPES)}
    soft = model.predict(soft=True)
    assert isinstance(soft, pd.DataFrame)
    assert soft.shape == (adata.n_obs, N_TYPES) and UNKNOWN not in soft.columns
    np.testing.assert_allclose(soft.sum(axis=1).to_numpy(), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(soft.idxmax(axis=1).to_numpy(), hard)
    truth = adata.obs["cell_type"].to_numpy()
    labelled = adata.obs["labels"].to_numpy() != UNKNOWN
    # chance is 1/3 on these three balanced types
    assert (hard[labelled] == truth[labelled]).mean() > 0.8
    assert (hard[~labelled] == truth[~labelled]).mean() > 0.8
    latent = model.get_latent_representation()
    assert latent.shape == (adata.n_obs, 8) and latent.min() >= 0 and latent.max() <= 1
    # the Boltzmann prior kept training through its negative phase
    history = model.history
    assert "train_classification_loss" in history and "train_accuracy" in history
    assert float(np.nansum(history["sampler_seconds"].to_numpy(dtype=float))) > 0
    assert not torch.equal(model.module.prior.h.detach(), prior_before)


def test_loss_adds_the_weighted_cross_entropy(trained):
    model, _ = trained
    module = model.module
    module.eval()
    labelled = np.flatnonzero(model.adata.obs["labels"].to_numpy() != UNKNOWN)[:64]
    loader = model._make_data_loader(adata=model.adata, indices=labelled, batch_size=64)
    tensors = next(iter(loader))
    with torch.no_grad():
        inference = module.inference(**module._get_inference_input(tensors))
        generative = module.generative(**module._get_generative_input(tensors, inference))
        plain = module.loss(tensors, inference, generative)
        with_labels = module.loss(
            tensors, inference, generative, labelled_tensors=tensors, classification_ratio=7.0
        )
        logits = module.classify(
            tensors["X"], batch_index=tensors["batch"], use_posterior_mean=True
        )
    ce = torch.nn.functional.cross_entropy(logits, tensors["labels"].view(-1).long())
    torch.testing.assert_close(with_labels.classification_loss, ce)
    torch.testing.assert_close(with_labels.loss, plain.loss + 7.0 * ce)
    assert plain.classification_loss is None


def test_save_load_with_and_without_adata(trained, tmp_path):
    model, _ = trained
    model.save(tmp_path / "m", overwrite=True)
    expected_soft = model.predict(soft=True)
    expected_latent = model.get_latent_representation()
    adata = model.adata.copy()
    loaded = scqbm.QBMSCANVI.load(tmp_path / "m", adata=adata)
    pd.testing.assert_frame_equal(loaded.predict(soft=True), expected_soft)
    np.testing.assert_allclose(loaded.get_latent_representation(), expected_latent, rtol=1e-6)
    model.save(tmp_path / "with_data", overwrite=True, save_anndata=True)
    bare = scqbm.QBMSCANVI.load(tmp_path / "with_data")
    np.testing.assert_array_equal(bare.predict(), model.predict())
    # without data: the registry alone rebuilds the label mapping
    no_data = scqbm.QBMSCANVI.load(tmp_path / "m", adata=None)
    assert no_data.adata is None
    np.testing.assert_array_equal(no_data.predict(adata.copy()), model.predict())
    assert no_data.unlabeled_category_ == UNKNOWN


def test_query_mapping_of_unlabelled_cells(trained, tmp_path):
    model, _ = trained
    query = separable_adata(n_cells=150, seed=1)
    query.obs["batch"] = "c"  # a new batch, no labels at all
    query.obs["labels"] = UNKNOWN
    scqbm.QBMSCANVI.prepare_query_anndata(query, model)
    mapped = scqbm.QBMSCANVI.load_query_data(query, model)
    classifier_before = {k: v.clone() for k, v in mapped.module.classifier.state_dict().items()}
    mapped.train(
        max_epochs=2, batch_size=64, plan_kwargs={"weight_decay": 0.0}, enable_progress_bar=False
    )
    for key, value in mapped.module.classifier.state_dict().items():  # frozen by scArches
        torch.testing.assert_close(value, classifier_before[key])
    predicted = mapped.predict()
    assert predicted.shape == (query.n_obs,)
    assert (predicted == query.obs["cell_type"].to_numpy()).mean() > 0.8
    assert mapped.registry["setup_args"] == {**model.registry["setup_args"]}


def test_query_without_a_labels_column(trained):
    model, _ = trained
    query = separable_adata(n_cells=60, seed=2)
    del query.obs["labels"]  # scvi marks every cell of such a query as unlabelled
    mapped = scqbm.QBMSCANVI.load_query_data(query, model)
    assert len(mapped._unlabeled_indices) == query.n_obs
    assert mapped.predict().shape == (query.n_obs,)


def test_from_scvi_model_alias_and_errors(qbmvae):
    alias = scqbm.QBMSCANVI.from_scvi_model(qbmvae, UNKNOWN, labels_key="labels")
    assert isinstance(alias, scqbm.QBMSCANVI) and alias.was_pretrained
    with pytest.raises(ValueError, match="labels_key"):
        scqbm.QBMSCANVI.from_qbmvae_model(qbmvae, unlabeled_category=UNKNOWN)
    adata = separable_adata(n_cells=50)
    scqbm.QBMVAE.setup_anndata(adata, batch_key="batch")
    untrained = scqbm.QBMVAE(adata, n_latent=8, n_hidden=32)
    with pytest.raises(ValueError, match="not been trained"):
        scqbm.QBMSCANVI.from_qbmvae_model(untrained, UNKNOWN, labels_key="labels")
    scvi.model.SCVI.setup_anndata(adata, batch_key="batch")
    with pytest.raises(TypeError, match=r"SCANVI\.from_scvi_model"):
        scqbm.QBMSCANVI.from_qbmvae_model(scvi.model.SCVI(adata), UNKNOWN, labels_key="labels")


def test_scvi_scanvi_from_scvi_model_refuses_a_qbmvae_at_once(qbmvae):
    adata = qbmvae.adata
    obs_before, uns_keys = adata.obs.copy(), set(adata.uns)
    manager_before = qbmvae.adata_manager
    with pytest.raises(NotAnSCVIModelError, match=r"QBMSCANVI\.from_qbmvae_model"):
        scvi.model.SCANVI.from_scvi_model(qbmvae, UNKNOWN, labels_key="labels")
    # raised before scvi registered anything: the AnnData and the model are untouched
    pd.testing.assert_frame_equal(adata.obs, obs_before)
    assert set(adata.uns) == uns_keys
    assert qbmvae.adata_manager is manager_before
    qbmvae._validate_anndata(adata)
    # the hook does not change the ordinary untrained-model warning
    fresh = scqbm.QBMVAE(adata, n_latent=8, n_hidden=32)
    with pytest.warns(UserWarning, match="untrained"):
        fresh._check_if_trained()


def test_top_level_export():
    assert scqbm.QBMSCANVI is scqbm.model.QBMSCANVI
    assert "QBMSCANVI" in dir(scqbm)
