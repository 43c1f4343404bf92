"""scqbm: Boltzmann-machine priors for single-cell variational inference (QBM-VAE).

The Boltzmann machine and the samplers (:mod:`scqbm.prior`, :mod:`scqbm.samplers`) need only
torch, numpy and scipy; the scvi-tools model and everything that needs scvi-tools or scanpy is
imported on first use. A sampling host (``scqbm serve-sampler``, e.g. the Python 3.10 host
that runs kaiwu) therefore never imports scvi-tools.
"""

from __future__ import annotations

import importlib
import logging
from importlib.metadata import PackageNotFoundError, version

from . import prior, samplers

try:
    __version__ = version("scqbm")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

logger = logging.getLogger("scqbm")

# public name -> (module, attribute or None for the module itself)
_LAZY = {
    "QBMVAE": ("scqbm.model", "QBMVAE"),
    "QBMSCANVI": ("scqbm.model", "QBMSCANVI"),
    "QBMVAEModule": ("scqbm.module", "QBMVAEModule"),
    "QBMTrainingPlan": ("scqbm.train", "QBMTrainingPlan"),
    "datasets": ("scqbm.datasets", None),
    "nn": ("scqbm.nn", None),
    "tl": ("scqbm.tl", None),
    "benchmark": ("scqbm.benchmark", None),
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'scqbm' has no attribute {name!r}")
    module_name, attribute = _LAZY[name]
    module = importlib.import_module(module_name)
    value = module if attribute is None else getattr(module, attribute)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__all__ = [
    "QBMSCANVI",
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
