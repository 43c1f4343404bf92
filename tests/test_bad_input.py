"""Bad input: clear errors that name the problem and the fix; the user's AnnData untouched."""

from __future__ import annotations

import copy
import logging

import numpy as np
import pytest
import scipy.sparse as sp
import scvi
import torch

from scqbm import QBMVAE
from scqbm._validation import InvalidInputError
from scqbm.prior import LatentTooLargeError
from scqbm.samplers import BoltzmannSampler, SamplerError, register_sampler


@pytest.fixture
def adata():
    scvi.settings.seed = 0
    return scvi.data.synthetic_iid(batch_size=100, n_genes=40, n_batches=2, n_labels=2)


def snapshot(adata):
    return (
        adata.X.copy(),
        adata.obs.copy(),
        list(adata.uns.keys()),
        list(adata.obsm.keys()),
        {k: v.copy() for k, v in adata.layers.items()},
    )


def assert_unchanged(adata, before):
    X, obs, uns, obsm, layers = before
    np.testing.assert_array_equal(adata.X, X)
    assert adata.obs.equals(obs)
    assert list(adata.uns.keys()) == uns and list(adata.obsm.keys()) == obsm
    assert set(adata.layers) == set(layers)


@pytest.mark.parametrize(
    "corrupt,kwargs,match",
    [
        (lambda a: a.X.__setitem__((0, 0), np.nan), {}, "NaN or infinite"),
        (lambda a: a.X.__setitem__((1, 1), np.inf), {}, "NaN or infinite"),
        (lambda a: a.X.__setitem__((2, 2), -3), {}, "negative values"),
        (lambda a: a.X.__setitem__(3, 0), {}, "filter_cells"),
        (lambda a: None, {"layer": "counts"}, "Layer 'counts' not found"),
        (lambda a: None, {"batch_key": "sample"}, "batch_key"),
        (lambda a: None, {"categorical_covariate_keys": ["donor"]}, "categorical_covariate_keys"),
        (
            lambda a: a.obs.__setitem__("age", np.r_[np.nan, np.ones(a.n_obs - 1)]),
            {"continuous_covariate_keys": ["age"]},
            "Continuous covariate 'age' has 1 NaN",
        ),
        (
            lambda a: a.obs.__setitem__("age", np.r_[np.ones(a.n_obs - 1), np.inf]),
            {"continuous_covariate_keys": ["age"]},
            "NaN or infinite",
        ),
        (
            lambda a: a.obs.__setitem__("age", ["x"] * a.n_obs),
            {"continuous_covariate_keys": ["age"]},
            "not numeric",
        ),
        (
            lambda a: a.obs.__setitem__("sf", np.r_[0.0, np.ones(a.n_obs - 1)]),
            {"size_factor_key": "sf"},
            "finite and positive",
        ),
    ],
)
def test_setup_rejects_bad_data_without_touching_adata(adata, corrupt, kwargs, match):
    adata.X = adata.X.astype(np.float32)
    corrupt(adata)
    before = snapshot(adata)
    with pytest.raises(InvalidInputError, match=match):
        QBMVAE.setup_anndata(adata, **kwargs)
    assert_unchanged(adata, before)


def test_sparse_input_is_checked_too(adata):
    X = sp.csr_matrix(adata.X.astype(np.float32))
    X.data[0] = np.nan
    adata.X = X
    with pytest.raises(InvalidInputError, match="NaN"):
        QBMVAE.setup_anndata(adata)


def test_non_integer_values_warn_as_in_scvi(adata):
    # scvi-tools warns (ambient-corrected counts such as CellBender's are not integers).
    adata.X = np.log1p(adata.X.astype(np.float32))
    with pytest.warns(UserWarning, match="not integers.*gene_likelihood='normal'"):
        QBMVAE.setup_anndata(adata, batch_key="batch")
    QBMVAE(adata, n_latent=4)
    QBMVAE(adata, gene_likelihood="normal", n_latent=4)


def test_genes_without_counts_are_kept_with_a_logged_warning(adata, caplog):
    adata.X[:, [4, 7]] = 0
    with caplog.at_level(logging.WARNING, logger="scqbm"):
        QBMVAE.setup_anndata(adata, batch_key="batch")
    assert "2 of 40 genes have no counts" in caplog.text and "gene_4" in caplog.text
    model = QBMVAE(adata, n_latent=4)
    model.train(max_epochs=1, enable_progress_bar=False)
    assert np.isfinite(model.get_latent_representation()).all()


def test_bad_model_arguments(adata):
    QBMVAE.setup_anndata(adata)
    with pytest.raises(ValueError, match="gene_likelihood"):
        QBMVAE(adata, gene_likelihood="gaussian")
    with pytest.raises(ValueError, match="prior"):
        QBMVAE(adata, prior="gaussian")
    with pytest.raises(ValueError, match="relaxation"):
        QBMVAE(adata, relaxation="gumbel")
    with pytest.raises(ValueError, match="Unknown sampler"):
        QBMVAE(adata, sampler="nope")
    with pytest.raises(LatentTooLargeError, match="log_partition='auto'"):
        QBMVAE(adata, n_latent=32, prior="bm", log_partition="exact")
    QBMVAE(adata, n_latent=32, prior="rbm", log_partition="exact")  # 16 + 16: exact is fine


def test_genes_that_do_not_match_on_load_and_query(adata, tmp_path):
    QBMVAE.setup_anndata(adata, batch_key="batch")
    model = QBMVAE(adata, n_latent=4)
    model.train(max_epochs=1, enable_progress_bar=False)
    model.save(tmp_path / "m")
    latent = model.get_latent_representation()
    other = adata[:, ::-1].copy()
    with pytest.warns(UserWarning, match="another order; reordering"):
        loaded = QBMVAE.load(tmp_path / "m", adata=other)
    assert list(other.var_names) == list(adata.var_names)  # reordered in place
    np.testing.assert_allclose(loaded.get_latent_representation(), latent, rtol=1e-5, atol=1e-6)
    permuted_query = adata[:, ::-1].copy()
    with pytest.warns(UserWarning, match="another order"):
        QBMVAE.load_query_data(permuted_query, model)
    assert list(permuted_query.var_names) == list(adata.var_names)
    fewer = adata[:, 5:].copy()
    with pytest.raises(InvalidInputError, match="5 of the model's genes are missing"):
        QBMVAE.load_query_data(fewer, model)
    with pytest.raises(InvalidInputError, match="prepare_query_anndata"):
        QBMVAE.load_query_data(fewer, str(tmp_path / "m"))


def test_categories_that_do_not_match_on_load(adata, tmp_path):
    QBMVAE.setup_anndata(adata, batch_key="batch")
    model = QBMVAE(adata, n_latent=4)
    model.train(max_epochs=1, enable_progress_bar=False)
    model.save(tmp_path / "m")
    new = adata.copy()
    new.obs["batch"] = new.obs["batch"].astype(str).replace({"batch_0": "batch_9"})
    with pytest.raises(ValueError, match=r"batch_9|categor"):
        QBMVAE.load(tmp_path / "m", adata=new)


class _FailingSampler(BoltzmannSampler):
    name = "failing_for_test"

    def __init__(self, n_units, fail_after=2, num_chains=16):
        super().__init__()
        self.n_units, self.fail_after, self.num_chains, self.calls = (
            n_units,
            fail_after,
            num_chains,
            0,
        )

    def _sample(self, h, W, num_reads, n_visible):
        self.calls += 1
        if self.calls > self.fail_after:
            raise ConnectionError("device went away")
        return torch.bernoulli(torch.full((num_reads, h.shape[0]), 0.5)), {}


def test_sampler_failure_mid_training_names_sampler_and_step(adata):
    register_sampler(_FailingSampler.name, _FailingSampler)
    QBMVAE.setup_anndata(adata, batch_key="batch")
    model = QBMVAE(
        adata, n_latent=4, sampler=_FailingSampler.name, sampler_kwargs={"fail_after": 2}
    )
    with pytest.raises(
        SamplerError, match=r"failing_for_test.*step 2.*ConnectionError: device went away"
    ):
        model.train(max_epochs=3, enable_progress_bar=False)


def test_setup_does_not_copy_or_mutate_counts(adata):
    X = copy.deepcopy(adata.X)
    QBMVAE.setup_anndata(adata, batch_key="batch")
    np.testing.assert_array_equal(adata.X, X)


def test_setup_checks_every_value_chunk_by_chunk(adata, monkeypatch):
    # Chunks of 50 stored values: each defect sits beyond the first chunk.
    from scqbm import _validation

    monkeypatch.setattr(_validation, "CHUNK_VALUES", 50)
    counts = adata.X.astype(np.float32)
    for make in (np.asarray, sp.csr_matrix, sp.csc_matrix):
        for value, kind in ((np.nan, UserWarning), (-1.0, UserWarning), (0.5, None)):
            data = adata.copy()
            X = counts.copy()
            X[-1, -1] = value
            data.X = make(X)
            if kind is None:
                with pytest.warns(UserWarning, match="1 values are not integers"):
                    QBMVAE.setup_anndata(data)
            else:
                with pytest.raises(InvalidInputError, match=r"NaN|negative"):
                    QBMVAE.setup_anndata(data)


def test_non_integer_count_after_the_first_million_values_is_found():
    rng = np.random.default_rng(0)
    X = sp.random(2_100, 1_000, density=0.5, format="csr", random_state=0, dtype=np.float32)
    X.data = rng.integers(1, 5, size=X.nnz).astype(np.float32)
    assert X.nnz > 1_000_000
    X.data[-1] = 1.5
    from anndata import AnnData

    data = AnnData(X)
    with pytest.warns(UserWarning, match="1 values are not integers"):
        QBMVAE.setup_anndata(data)


def test_error_in_model_construction_leaves_adata_as_before_setup(adata):
    before = snapshot(adata)
    QBMVAE.setup_anndata(adata, batch_key="batch")
    assert "_scvi_batch" in adata.obs
    with pytest.raises(ValueError, match="relaxation") as info:
        QBMVAE(adata, relaxation="gumbel")
    assert "restored to its state before" in "".join(getattr(info.value, "__notes__", []))
    assert not [c for c in adata.obs.columns if c.startswith("_scvi_")]
    assert "_scvi_uuid" not in adata.uns and "_scvi_manager_uuid" not in adata.uns
    assert_unchanged(adata, before)
    # The corrected call works without a second setup_anndata.
    model = QBMVAE(adata, n_latent=4)
    assert model.adata_manager.get_state_registry("batch").original_key == "batch"


def test_single_cell_clear_error_for_training_and_fine_for_queries(adata):
    one = adata[:1].copy()
    QBMVAE.setup_anndata(one)
    model = QBMVAE(one, n_latent=4)  # scvi's library statistics crashed on one cell
    with pytest.raises(InvalidInputError, match="at least 3 cells"):
        model.train(max_epochs=1, enable_progress_bar=False)
    QBMVAE.setup_anndata(adata)
    reference = QBMVAE(adata, n_latent=4)
    reference.train(max_epochs=1, enable_progress_bar=False)
    assert reference.get_latent_representation(adata[:1].copy()).shape == (1, 4)


def test_no_adata_and_no_registry_names_the_data_module_way():
    # As SCVI: built on train(datamodule=...); the warning names the registry way too.
    with pytest.warns(UserWarning, match=r"registry=datamodule.registry"):
        model = QBMVAE()
    with pytest.raises(AttributeError, match=r"train\(datamodule=\.\.\.\)"):
        model.train(max_epochs=1)
