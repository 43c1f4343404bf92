"""End to end on real data: the CLI, and scanpy's neighbors/UMAP/leiden on the embedding."""

from __future__ import annotations

import subprocess
import sys

import anndata as ad
import numpy as np
import pytest
import scanpy as sc

import scqbm

pytestmark = pytest.mark.realdata


def test_cli_integrate_default_dataset_subset(tmp_path, kang_path):
    out = tmp_path / "kang.h5ad"
    figure = tmp_path / "umap.png"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "scqbm.cli",
            "integrate",
            "--out",
            str(out),
            "--max-cells",
            "1500",
            "--max-epochs",
            "3",
            "--n-latent",
            "16",
            "--plot",
            str(figure),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "scqbm integrate: done" in result.stdout
    assert "log Z" in result.stdout and "(exact)" in result.stdout
    written = ad.read_h5ad(out)
    assert written.n_obs == 1500
    assert written.obsm["X_qbmvae"].shape == (1500, 16)
    assert written.obsm["X_umap"].shape == (1500, 2)
    assert np.isfinite(written.obs["qbmvae_energy"]).all()
    assert written.uns["qbmvae"]["log_partition_method"] == "exact"
    assert figure.stat().st_size > 10_000


def test_cli_reports_bad_arguments_clearly(tmp_path):
    missing = subprocess.run(
        [sys.executable, "-m", "scqbm.cli", "integrate", str(tmp_path / "nope.h5ad")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert missing.returncode != 0 and "does not exist" in missing.stderr
    usage = subprocess.run(
        [sys.executable, "-m", "scqbm.cli", "integrate", "--prior", "gaussian"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert usage.returncode == 2 and "invalid choice" in usage.stderr


def test_scanpy_neighbors_umap_leiden_on_embedding(kang_path):
    adata = ad.read_h5ad(kang_path)
    rng = np.random.default_rng(0)
    adata = adata[np.sort(rng.choice(adata.n_obs, 2000, replace=False))].copy()
    adata = adata[:, adata.var["highly_variable_2000_seurat_v3_by_stim"].to_numpy()].copy()
    sc.pp.filter_genes(adata, min_counts=1)
    scqbm.tl.integrate(adata, batch_key="stim", max_epochs=5, model_kwargs={"n_latent": 16})
    sc.pp.neighbors(adata, use_rep="X_qbmvae")
    sc.tl.umap(adata)
    sc.tl.leiden(adata, flavor="igraph", n_iterations=2, key_added="qbm_leiden")
    assert adata.obsm["X_umap"].shape == (2000, 2)
    n_clusters = adata.obs["qbm_leiden"].nunique()
    assert 3 <= n_clusters <= 60
    # Even a short training separates the major types better than chance.
    from sklearn.metrics import adjusted_rand_score

    ari = adjusted_rand_score(adata.obs["cell_type_derived"], adata.obs["qbm_leiden"])
    assert ari > 0.2


def test_scanpy_neighbors_approximate_path_on_a_large_embedding():
    """From 8,192 cells scanpy switches to pynndescent; its 0.7 release broke this path."""
    rng = np.random.default_rng(0)
    adata = ad.AnnData(np.zeros((9_000, 1), dtype=np.float32))
    adata.obsm["X_qbmvae"] = rng.random((9_000, 16), dtype=np.float32)
    sc.pp.neighbors(adata, use_rep="X_qbmvae", n_neighbors=15)
    neighbours = adata.obsp["distances"].getnnz(axis=1)
    assert adata.obsp["connectivities"].shape == (9_000, 9_000)
    assert neighbours.min() >= 14  # k - 1 neighbours besides the cell, or a few more
