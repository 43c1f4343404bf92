"""``scqbm integrate``: one-line user errors naming the flag, and the input never lost."""

from __future__ import annotations

import hashlib

import anndata as ad
import numpy as np
import pytest
import scvi

from scqbm.cli import UsageError, main


@pytest.fixture
def h5ad(tmp_path):
    data = scvi.data.synthetic_iid(batch_size=40, n_genes=30, n_batches=2, n_labels=2)
    data.X = data.X.astype(np.float32)
    path = tmp_path / "in.h5ad"
    data.write_h5ad(path)
    noisy = data.copy()
    noisy.X = noisy.X + 0.5
    noisy.write_h5ad(tmp_path / "lognorm.h5ad")
    return path


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize(
    "extra,phrase",
    [
        (["--batch-key", "nope"], "--batch-key 'nope' is not a column of obs"),
        (["--labels-key", "nope"], "--labels-key 'nope'"),
        (["--layer", "raw", "--n-top-genes", "10"], "--layer 'raw' is not a layer"),
        (["--genes-key", "hvg"], "--genes-key 'hvg'"),
        (["--n-top-genes", "0"], "--n-top-genes must be between 1 and 30"),
        (["--max-epochs", "0"], "--max-epochs must be a positive integer"),
    ],
)
def test_user_errors_are_one_line_with_the_flag(h5ad, capsys, extra, phrase):
    assert main(["integrate", str(h5ad), "--out", str(h5ad.parent / "o.h5ad"), *extra]) == 2
    err = capsys.readouterr().err
    assert phrase in err and err.count("\n") == 1 and "Traceback" not in err


def test_non_integer_values_name_the_flags(h5ad, capsys):
    assert main(["integrate", str(h5ad.parent / "lognorm.h5ad"), "--batch-key", "batch"]) == 2
    err = capsys.readouterr().err
    assert "--layer NAME" in err and "--gene-likelihood normal" in err
    assert "setup_anndata" not in err


def test_debug_shows_the_traceback(h5ad):
    with pytest.raises(UsageError, match="--batch-key"):
        main(["integrate", str(h5ad), "--batch-key", "nope", "--debug"])


def test_the_input_is_never_overwritten_without_overwrite(h5ad, capsys):
    before = digest(h5ad)
    assert main(["integrate", str(h5ad), "--batch-key", "batch", "--out", str(h5ad)]) == 2
    assert "is the input file" in capsys.readouterr().err and digest(h5ad) == before


def test_overwrite_keeps_the_full_input_and_adds_results(h5ad):
    original = ad.read_h5ad(h5ad)
    args = ["integrate", str(h5ad), "--batch-key", "batch", "--out", str(h5ad), "--overwrite"]
    options = ["--max-epochs", "1", "--n-top-genes", "10", "--max-cells", "60", "--no-umap"]
    assert main([*args, *options, "--n-latent", "4"]) == 0
    written = ad.read_h5ad(h5ad)
    assert written.shape == original.shape and list(written.var_names) == list(original.var_names)
    assert np.array_equal(written.X, original.X)
    embedding = written.obsm["X_qbmvae"]
    assert embedding.shape == (80, 4) and np.isnan(embedding).any(axis=1).sum() == 20
    assert not list(h5ad.parent.glob(".in.h5ad.*"))  # the temporary file is gone
