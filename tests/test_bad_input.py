"""Bad input: clear errors that name the problem and the fix; the user's AnnData untouched."""

from __future__ import annotations

import copy

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
        (lambda a: a.X.__setitem__((slice(None), 4), 0), {}, "filter_genes"),
        (lambda a: None, {"layer": "counts"}, "Layer 'counts' not found"),
        (lambda a: None, {"batch_key": "sample"}, "batch_key"),
        (lambda a: None, {"categorical_covariate_keys": ["donor"]}, "categorical_covariate_keys"),
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


def test_non_integer_values_with_count_likelihood(adata):
    adata.X = np.log1p(adata.X.astype(np.float32))
    QBMVAE.setup_anndata(adata, batch_key="batch")
    with pytest.raises(InvalidInputError, match="gene_likelihood='normal'"):
        QBMVAE(adata)
    QBMVAE(adata, gene_likelihood="normal", n_latent=4)  # the named fix works


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
    other = adata[:, ::-1].copy()
    with pytest.raises(InvalidInputError, match="different order"):
        QBMVAE.load(tmp_path / "m", adata=other)
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
