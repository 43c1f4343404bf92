"""Saved models: verified before unpickling, never loaded when changed, no secrets inside."""

from __future__ import annotations

import hashlib
import json
import os
import pickle

import pytest
import scvi
import torch

from scqbm import QBMVAE
from scqbm.model import ModelIntegrityError
from scqbm.samplers import GibbsSampler, SamplerError, register_sampler


@pytest.fixture(scope="module")
def adata():
    scvi.settings.seed = 0
    data = scvi.data.synthetic_iid(batch_size=40, n_genes=20, n_batches=2, n_labels=2)
    QBMVAE.setup_anndata(data, batch_key="batch")
    return data


@pytest.fixture(scope="module")
def saved(adata, tmp_path_factory):
    model = QBMVAE(
        adata,
        n_latent=4,
        n_hidden=8,
        sampler="remote",  # no service there: every step falls back to local chains
        sampler_kwargs={
            "url": "http://127.0.0.1:9",
            "token": "hunter2-secret",
            "on_failure": "fallback",
            "max_retries": 0,
            "connect_timeout": 0.5,
            "num_chains": 16,
        },
    )
    model.train(max_epochs=2, batch_size=40, enable_progress_bar=False)
    path = tmp_path_factory.mktemp("models") / "model"
    digest = model.save(path, save_anndata=True)
    return model, path, digest


def copy_of(path, tmp_path):
    target = tmp_path / "copy"
    target.mkdir()
    for name in os.listdir(path):
        (target / name).write_bytes((path / name).read_bytes())
    return target


def test_round_trip_is_verified_and_exact(saved, adata):
    model, path, digest = saved
    manifest = json.loads((path / "manifest.json").read_text())
    assert set(manifest["files"]) == {"model.pt", "adata.h5ad"}
    assert hashlib.sha256((path / "manifest.json").read_bytes()).hexdigest() == digest
    loaded = QBMVAE.load(path, adata=adata, expected_sha256=digest)
    for key, value in model.module.state_dict().items():
        assert torch.equal(value, loaded.module.state_dict()[key]), key
    original, reloaded = model.history["elbo_train"], loaded.history["elbo_train"]
    # scvi logs object columns; they come back as float64 with the same values and index.
    assert reloaded.equals(original.astype("float64"))
    assert loaded.is_trained_ and QBMVAE.load(path).adata is not None
    with pytest.raises(ModelIntegrityError, match="expected SHA-256"):
        QBMVAE.load(path, expected_sha256="0" * 64)


def test_secrets_are_not_saved(saved):
    model, path, _ = saved
    assert b"hunter2-secret" not in (path / "model.pt").read_bytes()
    # The live model keeps its arguments; the loaded one has no token.
    assert "hunter2-secret" in repr(model.init_params_)
    loaded = QBMVAE.load(path)
    assert "token" not in repr(loaded.init_params_)


@pytest.mark.parametrize("damage", ["flip", "truncate", "append", "adata", "manifest", "extra"])
def test_changed_files_never_load(saved, tmp_path, damage):
    _, path, _ = saved
    target = copy_of(path, tmp_path)
    model_file = target / "model.pt"
    raw = bytearray(model_file.read_bytes())
    if damage == "flip":
        middle = len(raw) // 2
        raw[middle : middle + 64] = bytes(b ^ 0xFF for b in raw[middle : middle + 64])
        model_file.write_bytes(raw)
    elif damage == "truncate":
        model_file.write_bytes(raw[:-100])
    elif damage == "append":
        model_file.write_bytes(raw + b"\0")
    elif damage == "adata":
        (target / "adata.h5ad").write_bytes((target / "adata.h5ad").read_bytes()[:-1] + b"x")
    elif damage == "manifest":
        (target / "manifest.json").write_text("{not json")
    elif damage == "extra":
        (target / "mdata.h5mu").write_bytes(b"surprise")
    with pytest.raises(ModelIntegrityError):
        QBMVAE.load(target)
    with pytest.raises(ModelIntegrityError):
        QBMVAE.load(target, allow_unverified=True)  # never an escape for a changed file


class _RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


MARKER = "/tmp/scqbm-test-pickle-ran"


def test_a_crafted_pickle_with_a_matching_manifest_cannot_run_code(saved, tmp_path):
    from scqbm.model._integrity import write_manifest

    _, path, _ = saved
    target = copy_of(path, tmp_path)
    if os.path.exists(MARKER):
        os.remove(MARKER)
    payload = torch.load(target / "model.pt", weights_only=False)
    payload["attr_dict"]["evil_"] = _RunsCode()
    torch.save(payload, target / "model.pt", pickle_protocol=pickle.HIGHEST_PROTOCOL)
    write_manifest(str(target))  # an attacker who can write files can rewrite this too
    with pytest.raises(ModelIntegrityError, match="weights_only=True"):
        QBMVAE.load(target)
    assert not os.path.exists(MARKER)


def test_directories_without_a_manifest_need_allow_unverified(saved, tmp_path):
    _, path, _ = saved
    target = copy_of(path, tmp_path)
    (target / "manifest.json").unlink()
    with pytest.raises(ModelIntegrityError, match="allow_unverified=True"):
        QBMVAE.load(target)
    assert QBMVAE.load(target, allow_unverified=True).is_trained_


class FailingSampler(GibbsSampler):
    """Gibbs chains that fail on the ``fail_at``-th call."""

    name = "failing_test_sampler"

    def __init__(self, n_units, fail_at=3, **kwargs):
        super().__init__(n_units, **kwargs)
        self.fail_at, self.calls = fail_at, 0

    def _sample(self, h, W, num_reads, n_visible):
        self.calls += 1
        if self.calls == self.fail_at:
            raise SamplerError("the test backend is down")
        return super()._sample(h, W, num_reads, n_visible)


register_sampler(FailingSampler.name, FailingSampler)


def failing_model(**sampler_kwargs) -> QBMVAE:
    """A small QBMVAE on 80 cells whose sampler fails at call ``fail_at`` (2 calls an epoch)."""
    data = scvi.data.synthetic_iid(batch_size=40, n_genes=20, n_batches=2, n_labels=2)
    QBMVAE.setup_anndata(data, batch_key="batch")
    return QBMVAE(
        data,
        n_latent=4,
        n_hidden=8,
        sampler=FailingSampler.name,
        sampler_kwargs={"num_chains": 16, **sampler_kwargs},
    )


def test_a_failed_train_restores_weights_chains_and_log_z():
    model = failing_model(fail_at=4)
    before = {k: v.clone() for k, v in model.module.state_dict().items()}
    with pytest.raises(SamplerError, match="restored to their state before this train"):
        # 2 steps per epoch: the 4th sampler call is in epoch 1, after epoch 0 was logged.
        model.train(max_epochs=3, batch_size=40, train_size=1.0, enable_progress_bar=False)
    after = model.module.state_dict()
    changed = [  # log Z is NaN before the first estimate: NaN counts as equal
        k for k in before if not torch.equal(before[k].nan_to_num(7.0), after[k].nan_to_num(7.0))
    ]
    assert not changed, changed
    assert not model.is_trained_ and len(model.history["elbo_train"]) == 1
    # A second call starts from the restored state and succeeds.
    model.train(max_epochs=1, batch_size=40, train_size=1.0, enable_progress_bar=False)
    assert model.is_trained_


def test_a_failed_train_puts_a_seeded_samplers_random_stream_back():
    # Chains are buffers (covered above); the seeded generator lives outside the state_dict.
    model = failing_model(fail_at=5, seed=11)
    options = {"batch_size": 40, "train_size": 1.0, "enable_progress_bar": False}
    model.train(max_epochs=1, **options)  # sampler calls 1-2: the generator exists
    sampler = model.module.sampler
    stream = sampler._generator.get_state().clone()
    with pytest.raises(SamplerError):
        model.train(max_epochs=3, **options)  # calls 3-4 advance it, call 5 fails
    assert torch.equal(sampler._generator.get_state(), stream)
