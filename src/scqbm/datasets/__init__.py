"""Real-data loaders (with checksums), the scIB atlases for online users, and a simulator."""

from ._files import DatasetUnavailableError, cache_dir
from ._kang import (
    KANG_BATCH_KEY,
    KANG_HVG_KEY,
    KANG_LABELS_KEY,
    build_from_wheel,
    content_sha256,
    kang_ifnb,
)
from ._pbmc68k import PBMC68K_LABELS_KEY, pbmc68k_counts
from ._scib import SCIB_DATASETS, load_scib, scib_immune_human, scib_lung_atlas, scib_pancreas
from ._simulate import simulate

__all__ = [
    "KANG_BATCH_KEY",
    "KANG_HVG_KEY",
    "KANG_LABELS_KEY",
    "PBMC68K_LABELS_KEY",
    "SCIB_DATASETS",
    "DatasetUnavailableError",
    "build_from_wheel",
    "cache_dir",
    "content_sha256",
    "kang_ifnb",
    "load_scib",
    "pbmc68k_counts",
    "scib_immune_human",
    "scib_lung_atlas",
    "scib_pancreas",
    "simulate",
]
