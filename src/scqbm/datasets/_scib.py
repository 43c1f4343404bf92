"""The scIB benchmark atlases (Luecken et al. 2022), downloaded from figshare when online."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ._files import DatasetUnavailableError, cache_dir, download, find_file


@dataclass(frozen=True)
class ScibDataset:
    """A dataset of the scIB benchmark: where it comes from and its annotation columns."""

    filename: str
    url: str
    batch_key: str
    labels_key: str
    counts_layer: str = "counts"


SCIB_DATASETS = {
    "pancreas": ScibDataset(
        "human_pancreas_norm_complexBatch.h5ad",
        "https://figshare.com/ndownloader/files/24539828",
        batch_key="tech",
        labels_key="celltype",
    ),
    "immune_human": ScibDataset(
        "Immune_ALL_human.h5ad",
        "https://figshare.com/ndownloader/files/25717328",
        batch_key="batch",
        labels_key="final_annotation",
    ),
    "lung_atlas": ScibDataset(
        "Lung_atlas_public.h5ad",
        "https://figshare.com/ndownloader/files/24539942",
        batch_key="batch",
        labels_key="cell_type",
    ),
}


def load_scib(name: str, path: str | Path | None = None, *, timeout: float = 60.0):
    """Load one scIB atlas: from ``path``, a data folder, the cache, or figshare.

    figshare publishes no checksums for these files and they could not be downloaded where
    scqbm is developed, so none is pinned: the file is checked for its batch and label
    columns instead.

    Parameters
    ----------
    name
        ``"pancreas"``, ``"immune_human"`` or ``"lung_atlas"``.
    path
        An explicit h5ad file.
    timeout
        Seconds to wait for figshare before giving up.

    Raises
    ------
    DatasetUnavailableError
        Offline or unreachable: the message gives the URL and where to put the file.

    """
    import anndata as ad

    if name not in SCIB_DATASETS:
        raise ValueError(f"Unknown scIB dataset {name!r}; choose from {sorted(SCIB_DATASETS)}.")
    spec = SCIB_DATASETS[name]
    if path is not None:
        file = Path(path)
        if not file.is_file():
            raise FileNotFoundError(f"load_scib: no file at {file}.")
    else:
        file = find_file(spec.filename)
    if file is None:
        target = cache_dir() / spec.filename
        try:
            file = download(spec.url, target, timeout=timeout)
        except DatasetUnavailableError as err:
            raise DatasetUnavailableError(
                f"The scIB {name} dataset is not available offline and figshare could not be "
                f"reached ({err}). Download {spec.url} on a machine with internet access and "
                f"save it as {target} (or in $SCQBM_DATA_DIR), or pass path=."
            ) from err
    adata = ad.read_h5ad(file)
    missing = [key for key in (spec.batch_key, spec.labels_key) if key not in adata.obs]
    if missing:
        raise DatasetUnavailableError(
            f"{file} lacks the obs columns {missing} of the scIB {name} dataset; is it the "
            f"right file? Expected it from {spec.url}."
        )
    return adata


def scib_pancreas(path: str | Path | None = None, **kwargs):
    """scIB human pancreas (9 technologies, ~16k cells); see :func:`load_scib`."""
    return load_scib("pancreas", path, **kwargs)


def scib_immune_human(path: str | Path | None = None, **kwargs):
    """scIB human immune cells (10 batches, ~33k cells); see :func:`load_scib`."""
    return load_scib("immune_human", path, **kwargs)


def scib_lung_atlas(path: str | Path | None = None, **kwargs):
    """scIB lung atlas (16 batches, ~32k cells); see :func:`load_scib`."""
    return load_scib("lung_atlas", path, **kwargs)
