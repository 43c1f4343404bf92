# scvi-tools 1.4.2 prints registries with `rich.pretty` without importing it.
import rich.pretty  # noqa: F401

from ._integrity import ModelIntegrityError
from ._qbmvae import QBMVAE

__all__ = ["QBMVAE", "ModelIntegrityError"]
