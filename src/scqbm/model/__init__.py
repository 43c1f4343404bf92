# scvi-tools 1.4.2 prints registries with `rich.pretty` without importing it.
import rich.pretty  # noqa: F401

from ._from_scvi_guard import NotAnSCVIModelError
from ._integrity import ModelIntegrityError
from ._qbmscanvi import QBMSCANVI
from ._qbmvae import QBMVAE

__all__ = ["QBMSCANVI", "QBMVAE", "ModelIntegrityError", "NotAnSCVIModelError"]
