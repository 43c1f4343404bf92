"""HTTP sampling service: ``scqbm serve-sampler`` hosts a backend for the ``remote`` sampler.

Importing this package needs no optional dependency; :func:`create_app`,
:class:`ServiceLimits`, :func:`serve_in_background` and :class:`BackgroundServer` import
FastAPI and uvicorn (``pip install 'scqbm[service]'``) when first used. The wire format is
:mod:`scqbm.samplers._wire`, shared with the ``remote`` client.
"""

from __future__ import annotations

import importlib

from .._wire import API_PREFIX, TOKEN_ENV, ProtocolError, decode_array, encode_array
from ._cli import add_serve_arguments, run_serve
from ._limits import ServiceLimits

_LAZY = {
    "create_app": "._app",
    "ServiceError": "._app",
    "serve_in_background": "._background",
    "BackgroundServer": "._background",
}

__all__ = [
    "API_PREFIX",
    "TOKEN_ENV",
    "BackgroundServer",
    "ProtocolError",
    "ServiceError",
    "ServiceLimits",
    "add_serve_arguments",
    "create_app",
    "decode_array",
    "encode_array",
    "run_serve",
    "serve_in_background",
]


def __getattr__(name: str):
    # FastAPI and uvicorn are an extra: import them only when the server is used.
    if name in _LAZY:
        try:
            module = importlib.import_module(_LAZY[name], __name__)
        except ImportError as err:
            raise ImportError(
                f"The sampling service needs FastAPI and uvicorn: pip install "
                f"'scqbm[service]' ({err})"
            ) from err
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
