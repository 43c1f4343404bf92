"""SCVI workflows that QBMVAE must run the same way: backed data, custom data modules,
reference mapping of a query with missing genes, legacy saves, minified data."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import scvi
import torch
from anndata import read_h5ad
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from scqbm import QBMVAE


@pytest.fixture
def adata():
    scvi.settings.seed = 0
    return scvi.data.synthetic_iid(batch_size=100, n_genes=30, n_batches=2, n_labels=2)


# ------------------------------------------------------------------ backed AnnData
@pytest.mark.parametrize("sparse", [False, True])
def test_backed_anndata_trains_and_answers_queries(adata, tmp_path, sparse):
    if sparse:
        adata.X = sp.csr_matrix(adata.X)
    path = tmp_path / "data.h5ad"
    adata.write_h5ad(path)
    backed = read_h5ad(path, backed="r")
    QBMVAE.setup_anndata(backed, batch_key="batch")
    model = QBMVAE(backed, n_latent=4, n_hidden=16)
    model.train(max_epochs=1, enable_progress_bar=False)
    latent = model.get_latent_representation()
    assert latent.shape == (adata.n_obs, 4) and np.isfinite(latent).all()
    # The same cells in memory give the same embedding.
    np.testing.assert_allclose(
        model.get_latent_representation(adata), latent, rtol=1e-5, atol=1e-6
    )
    assert model.get_normalized_expression(indices=[0, 1]).shape == (2, adata.n_vars)
    backed.file.close()


def test_backed_checks_read_every_value(adata, tmp_path, monkeypatch):
    from scqbm import _validation

    monkeypatch.setattr(_validation, "CHUNK_VALUES", 64)  # many chunks
    X = adata.X.astype(np.float32)
    X[-1, -1] += 0.5
    adata.X = sp.csr_matrix(X)
    adata.write_h5ad(tmp_path / "frac.h5ad")
    backed = read_h5ad(tmp_path / "frac.h5ad", backed="r")
    with pytest.warns(UserWarning, match="1 values are not integers"):
        QBMVAE.setup_anndata(backed)
    X[-1, -1] = np.nan
    adata.X = X
    adata.write_h5ad(tmp_path / "nan.h5ad")
    backed = read_h5ad(tmp_path / "nan.h5ad", backed="r")
    with pytest.raises(ValueError, match="1 NaN or infinite"):
        QBMVAE.setup_anndata(backed)
    assert "_scvi_uuid" not in backed.uns


# ------------------------------------------------------------ custom data module
class _Cells(Dataset):
    def __init__(self, X, batch):
        self.X, self.batch = torch.as_tensor(X, dtype=torch.float32), batch

    def __len__(self):
        return len(self.X)

    def __getitem__(self, i):
        return {
            "X": self.X[i],
            "batch": torch.tensor([self.batch[i]], dtype=torch.long),
            "labels": torch.zeros(1, dtype=torch.long),
        }


class CellsDataModule(LightningDataModule):
    """What lamindb's or the census data modules provide: scvi-style batches and a registry."""

    def __init__(self, X, batch_codes, var_names, batch_size=32):
        super().__init__()
        self.X, self.codes, self.var_names = X, np.asarray(batch_codes), np.asarray(var_names)
        self.batch_size = batch_size
        self.n_obs, self.n_vars = X.shape
        self.n_batch = int(self.codes.max()) + 1
        self.n_labels = 1
        # Read by scvi-tools' save for data-module models.
        self.n_samples, self.batch_labels, self.label_keys = 1, np.arange(self.n_batch), None

    def train_dataloader(self):
        return DataLoader(_Cells(self.X, self.codes), batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self):
        return DataLoader(_Cells(self.X[:40], self.codes[:40]), batch_size=self.batch_size)

    def inference_dataloader(self):
        return DataLoader(_Cells(self.X, self.codes), batch_size=self.batch_size)

    @property
    def registry(self):
        empty = {"data_registry": {}, "state_registry": {}, "summary_stats": {}}
        return {
            "scvi_version": scvi.__version__,
            "model_name": "QBMVAE",
            "setup_args": {
                "layer": None,
                "batch_key": "batch",
                "labels_key": None,
                "size_factor_key": None,
                "categorical_covariate_keys": None,
                "continuous_covariate_keys": None,
            },
            "field_registries": {
                "X": {
                    "data_registry": {"attr_name": "X", "attr_key": None},
                    "state_registry": {
                        "n_obs": self.n_obs,
                        "n_vars": self.n_vars,
                        "column_names": self.var_names,
                    },
                    "summary_stats": {"n_vars": self.n_vars, "n_cells": self.n_obs},
                },
                "batch": {
                    "data_registry": {"attr_name": "obs", "attr_key": "_scvi_batch"},
                    "state_registry": {
                        "categorical_mapping": np.arange(self.n_batch),
                        "original_key": "batch",
                    },
                    "summary_stats": {"n_batch": self.n_batch},
                },
                "labels": {
                    "data_registry": {"attr_name": "obs", "attr_key": "_scvi_labels"},
                    "state_registry": {
                        "categorical_mapping": np.array([0]),
                        "original_key": "_scvi_labels",
                    },
                    "summary_stats": {"n_labels": 1},
                },
                "size_factor": empty,
                "extra_categorical_covs": {
                    **empty,
                    "summary_stats": {"n_extra_categorical_covs": 0},
                },
                "extra_continuous_covs": {
                    **empty,
                    "summary_stats": {"n_extra_continuous_covs": 0},
                },
            },
            "setup_method_name": "setup_datamodule",
        }


def test_custom_datamodule_with_registry(adata):
    codes = adata.obs["batch"].cat.codes.to_numpy()
    datamodule = CellsDataModule(adata.X, codes, adata.var_names)
    model = QBMVAE(adata=None, registry=datamodule.registry, n_latent=4, n_hidden=16)
    model.train(max_epochs=2, datamodule=datamodule, enable_progress_bar=False)
    assert model.is_trained and len(model.history["elbo_train"]) == 2
    loader = datamodule.inference_dataloader()
    latent = model.get_latent_representation(dataloader=loader)
    assert latent.shape == (adata.n_obs, 4) and np.isfinite(latent).all()
    assert np.isfinite(model.get_elbo(dataloader=loader))
    assert model.get_normalized_expression(dataloader=loader).shape == adata.shape


# ---------------------------------------------------------------- reference mapping
def test_reference_mapping_of_a_query_with_missing_genes(adata, caplog):
    QBMVAE.setup_anndata(adata, batch_key="batch")
    reference = QBMVAE(adata, n_latent=6, n_hidden=16)
    reference.train(max_epochs=2, enable_progress_bar=False)
    scvi.settings.seed = 1
    query = scvi.data.synthetic_iid(batch_size=40, n_genes=30, n_batches=1, n_labels=2)
    query.obs["batch"] = "query_lab"
    query = query[:, 5:].copy()  # the query lacks 5 of the reference's genes
    query.var_names = adata.var_names[5:]
    QBMVAE.prepare_query_anndata(query, reference)  # pads them with zeros
    assert query.n_vars == adata.n_vars and query[:, adata.var_names[:5]].X.sum() == 0
    with caplog.at_level("WARNING", logger="scqbm"):
        mapped = QBMVAE.load_query_data(query, reference)
    assert "5 of 30 genes have no counts" in caplog.text
    mapped.train(max_epochs=3, plan_kwargs={"weight_decay": 0.0}, enable_progress_bar=False)
    latent = mapped.get_latent_representation()
    assert latent.shape == (query.n_obs, 6) and np.isfinite(latent).all()
    assert np.isfinite(mapped.history["elbo_train"].to_numpy(dtype=float)).all()


# ----------------------------------------------------------- legacy save, minify
@pytest.fixture
def trained(adata):
    QBMVAE.setup_anndata(adata, batch_key="batch")
    model = QBMVAE(adata, n_latent=5, n_hidden=16)
    model.train(max_epochs=2, enable_progress_bar=False)
    return model


def test_legacy_save_layout_converts_and_loads(trained, adata, tmp_path):
    import pickle

    # scvi-tools' legacy (<0.15) layout: state dict, var_names.csv, attr.pkl.
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    torch.save(trained.module.state_dict(), legacy / "model_params.pt")
    np.savetxt(legacy / "var_names.csv", adata.var_names.to_numpy(), fmt="%s")
    attributes = {k: v for k, v in trained._get_user_attributes() if k.endswith("_")}
    with open(legacy / "attr.pkl", "wb") as handle:
        pickle.dump(attributes, handle)
    QBMVAE.convert_legacy_save(str(legacy), str(tmp_path / "converted"))
    loaded = QBMVAE.load(  # converted files carry no manifest: trusted, unverified
        str(tmp_path / "converted"), adata=adata, allow_unverified=True
    )
    np.testing.assert_array_equal(
        loaded.get_latent_representation(), trained.get_latent_representation()
    )


def test_minify_keeps_bernoulli_logits_and_queries(trained, adata, tmp_path):
    mean = trained.get_latent_representation()
    qzm, qzv = trained.get_latent_representation(give_mean=False, return_dist=True)
    adata.obsm["X_latent_qzm"], adata.obsm["X_latent_qzv"] = qzm, qzv  # SCVI's tutorial
    expression = trained.get_normalized_expression(library_size=1e4, n_samples=20).mean(0)
    trained.minify_adata()
    mini = trained.adata
    assert trained.minified_data_type == "latent_posterior_parameters"
    assert mini.X.nnz == 0 and "qbmvae_latent_logits" in mini.obsm
    np.testing.assert_allclose(1 / (1 + np.exp(-mini.obsm["qbmvae_latent_logits"])), mean, 1e-5)
    # Queries start from the stored posterior: the same answers without the counts.
    np.testing.assert_allclose(trained.get_latent_representation(), mean, rtol=1e-5)
    draws = trained.get_latent_representation(give_mean=False)
    assert set(np.unique(draws)) <= {0.0, 1.0}
    # Decoded from posterior draws: equal on average over cells and draws.
    minified = trained.get_normalized_expression(library_size=1e4, n_samples=20).mean(0)
    np.testing.assert_allclose(minified, expression, rtol=0.05)
    trained.save(tmp_path / "mini", save_anndata=True)
    loaded = QBMVAE.load(tmp_path / "mini")
    assert loaded.minified_data_type == "latent_posterior_parameters"
    np.testing.assert_allclose(loaded.get_latent_representation(), mean, rtol=1e-5)
    with pytest.raises(ValueError, match="already minified"):
        trained.minify_adata()
