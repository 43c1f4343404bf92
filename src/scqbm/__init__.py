"""scqbm: Boltzmann-machine priors for single-cell variational inference (QBM-VAE)."""

from __future__ import annotations

import logging
from importlib.metadata import PackageNotFoundError, version

# scvi-tools 1.4.2 prints registries with `rich.pretty` without importing it.
import rich.pretty  # noqa: F401

from . import datasets, nn, prior, samplers, tl
from .model import QBMVAE
from .module import QBMVAEModule
from .train import QBMTrainingPlan

try:
    __version__ = version("scqbm")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

logger = logging.getLogger("scqbm")

__all__ = [
    "QBMVAE",
    "QBMTrainingPlan",
    "QBMVAEModule",
    "__version__",
    "datasets",
    "nn",
    "prior",
    "samplers",
    "tl",
]
