"""The sampling service: a FastAPI app that serves one registered sampler backend over HTTP."""

from __future__ import annotations

import hmac
import inspect
import json
import logging
import math
import threading
from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .._base import BoltzmannSampler, validate_problem
from .._kaiwu_sdk import KaiwuCredentialsError
from .._registry import make_sampler
from ._protocol import API_PREFIX, ProtocolError, decode_array, encode_bits

logger = logging.getLogger(__name__)

#: Keys of backend arguments never echoed by ``/v1/info``.
_SECRET_WORDS = ("token", "code", "secret", "password", "user_id", "key")


@dataclass(frozen=True)
class ServiceLimits:
    """Request limits of the sampling service.

    Attributes
    ----------
    max_spins
        Largest number of units of a problem.
    max_reads
        Largest ``num_reads`` of one request.
    max_payload_bytes
        Largest request body; a 2048-unit ``W`` in float64 is 32 MiB, 43 MiB as base64.

    """

    max_spins: int = 2048
    max_reads: int = 10_000
    max_payload_bytes: int = 64 * 2**20

    def __post_init__(self):
        for name, value in asdict(self).items():
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(
                    f"ServiceLimits.{name} must be a positive integer, got {value!r}."
                )


class ServiceError(Exception):
    """An error answered as ``{"error": {"code", "message"}}`` with an HTTP status."""

    def __init__(self, status: int, code: str, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


class SampleRequest(BaseModel):
    """Body of ``POST /v1/sample`` (arrays are decoded and checked afterwards)."""

    model_config = ConfigDict(extra="forbid")

    h: list | dict
    W: list | dict
    num_reads: int = Field(strict=True, ge=1)
    n_visible: int | None = Field(default=None, strict=True)


class _Backends:
    """One backend instance per problem size, used by one request at a time."""

    def __init__(self, name: str, kwargs: dict[str, Any], device: str, max_cached: int = 4):
        self.device = torch.device(device)
        try:  # an unusable device fails at startup, not on every request
            torch.empty(0, device=self.device)
        except (AssertionError, RuntimeError) as err:  # torch asserts on a missing CUDA
            raise ValueError(f"Device {device!r} is not usable here: {err}") from err
        probe = make_sampler(name, 2, **kwargs)  # fails at startup on bad arguments
        kwargs = dict(kwargs)
        # Requests from different clients must not continue each other's Markov chains.
        accepts = inspect.signature(type(probe).__init__).parameters
        self.stateless = "persistent" in accepts and "persistent" not in kwargs
        if self.stateless:
            kwargs["persistent"] = False
        self.name, self.kwargs, self.max_cached = name, kwargs, max_cached
        self._cache: OrderedDict[int, BoltzmannSampler] = OrderedDict()
        # Samplers keep state (random generators, buffers) and are not thread-safe.
        self._lock = threading.Lock()
        preflight = getattr(probe, "preflight", None)
        if preflight is not None:
            preflight()

    def sample(self, h, W, num_reads, n_visible):
        with self._lock:
            n = h.shape[0]
            sampler = self._cache.pop(n, None)
            if sampler is None:
                sampler = make_sampler(self.name, n, **self.kwargs).to(self.device)
            self._cache[n] = sampler
            while len(self._cache) > self.max_cached:
                self._cache.popitem(last=False)
            h, W = h.to(self.device), W.to(self.device)
            with torch.no_grad():
                return sampler.sample(h, W, num_reads, n_visible=n_visible)


def _jsonable(value):
    """Backend info as plain JSON (non-finite floats become null)."""
    if isinstance(value, bool) or value is None or isinstance(value, str | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return _jsonable(value.item())
    if isinstance(value, torch.Tensor | np.ndarray):
        return _jsonable(value.tolist())
    return str(value)


def _redact(kwargs: dict) -> dict:
    return {
        k: "***" if any(word in k.lower() for word in _SECRET_WORDS) else _jsonable(v)
        for k, v in kwargs.items()
    }


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it exceeds ``limit`` bytes."""
    too_large = ServiceError(
        413,
        "payload_too_large",
        f"The request body exceeds this service's limit of {limit} bytes (max_payload_bytes).",
    )
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise ServiceError(400, "bad_request", "Invalid Content-Length header.")
        if int(declared) > limit:
            raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:  # a chunked body has no Content-Length to check up front
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def _parse(body: bytes, limits: ServiceLimits):
    """Decode and check a sampling request; ``ServiceError`` with a 4xx status otherwise."""
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ServiceError(
            400, "bad_json", f"The request body is not valid JSON: {err}."
        ) from None
    try:
        request = SampleRequest.model_validate(payload)
    except ValidationError as err:
        details = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in err.errors()
        )
        raise ServiceError(
            422, "invalid_request", f"Invalid sampling request: {details}."
        ) from None
    try:
        h = decode_array(request.h, "h")
        W = decode_array(request.W, "W")
    except ProtocolError as err:
        raise ServiceError(422, "invalid_request", str(err)) from None
    n = h.shape[0] if h.ndim == 1 else -1
    if n > limits.max_spins:
        raise ServiceError(
            413,
            "too_many_spins",
            f"The problem has {n} units; this service accepts at most {limits.max_spins} "
            "(max_spins).",
        )
    if request.num_reads > limits.max_reads:
        raise ServiceError(
            413,
            "too_many_reads",
            f"num_reads={request.num_reads} exceeds this service's limit of "
            f"{limits.max_reads} (max_reads); split the request.",
        )
    h, W = torch.from_numpy(h), torch.from_numpy(W)
    try:
        validate_problem(h, W)
        _check_bipartite(W, request.n_visible)
    except ValueError as err:
        raise ServiceError(422, "invalid_problem", str(err)) from None
    return h, W, request.num_reads, request.n_visible


def _check_bipartite(W: torch.Tensor, n_visible: int | None) -> None:
    # Block updates for an RBM are wrong if the sides are coupled within themselves.
    if n_visible is None:
        return
    n = W.shape[0]
    if not 0 < n_visible < n:
        raise ValueError(f"n_visible must be between 1 and {n - 1}, got {n_visible}.")
    if W[:n_visible, :n_visible].abs().max() > 0 or W[n_visible:, n_visible:].abs().max() > 0:
        raise ValueError(
            "n_visible is given but W couples units within a side: not a bipartite (RBM) "
            "problem. Omit n_visible for a dense problem."
        )


def create_app(
    backend: str = "gibbs",
    backend_kwargs: dict[str, Any] | None = None,
    *,
    token: str | None = None,
    limits: ServiceLimits | None = None,
    allow_no_token: bool = False,
    device: str = "cpu",
) -> FastAPI:
    """The sampling service for one registered backend.

    Parameters
    ----------
    backend
        Registered sampler name (:func:`scqbm.samplers.available_samplers`).
    backend_kwargs
        Its keyword arguments; validated at once by building the backend. Backends with a
        ``persistent`` argument run fresh chains per request unless it is given, because
        requests of different clients must not continue each other's chains.
    token
        Shared secret expected as ``Authorization: Bearer <token>``.
    limits
        Request limits (:class:`ServiceLimits`).
    allow_no_token
        Serve without authentication (``token=None``); refused otherwise.
    device
        Torch device the backend samples on (``"cuda"`` for the native samplers on a GPU).

    Returns
    -------
    The app: ``GET /v1/health`` (no authentication), ``GET /v1/info`` and
    ``POST /v1/sample`` (see :mod:`scqbm.samplers.service._protocol`).

    """
    if not token and not allow_no_token:
        raise ValueError(
            "The sampling service needs a token: --token or $SCQBM_SAMPLER_TOKEN (token= in "
            "Python), or --allow-no-token (allow_no_token=True) on a trusted network."
        )
    from scqbm import __version__

    limits = limits or ServiceLimits()
    backends = _Backends(backend, backend_kwargs or {}, device)
    app = FastAPI(title="scqbm sampling service", version=__version__)

    def authenticate(request: Request) -> None:
        if not token:
            return
        header = request.headers.get("authorization")
        if not header:
            raise ServiceError(
                401,
                "unauthorized",
                "Missing token: send the header 'Authorization: Bearer <token>'.",
                {"WWW-Authenticate": "Bearer"},
            )
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            value.strip().encode(), token.encode()
        ):
            raise ServiceError(403, "forbidden", "Invalid token.")

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, err: ServiceError):
        return JSONResponse(
            {"error": {"code": err.code, "message": err.message}},
            status_code=err.status,
            headers=err.headers,
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException):
        return JSONResponse(
            {"error": {"code": "http_error", "message": str(err.detail)}},
            status_code=err.status_code,
        )

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, err: RequestValidationError):
        return JSONResponse(
            {"error": {"code": "invalid_request", "message": str(err.errors())}},
            status_code=422,
        )

    @app.get(f"{API_PREFIX}/health")
    async def health():
        return {"status": "ok"}

    @app.get(f"{API_PREFIX}/info", dependencies=[Depends(authenticate)])
    async def info():
        return {
            "backend": backend,
            "backend_kwargs": _redact(backends.kwargs),
            "stateless": backends.stateless,
            "device": str(backends.device),
            "limits": asdict(limits),
            "version": __version__,
        }

    @app.post(f"{API_PREFIX}/sample", dependencies=[Depends(authenticate)])
    async def sample(request: Request):
        body = await _read_body(request, limits.max_payload_bytes)
        h, W, num_reads, n_visible = _parse(body, limits)
        try:
            # In a worker thread: the event loop keeps answering other clients meanwhile.
            result = await run_in_threadpool(backends.sample, h, W, num_reads, n_visible)
        except ValueError as err:
            raise ServiceError(422, "invalid_problem", str(err)) from None
        except (ImportError, KaiwuCredentialsError) as err:
            logger.error("backend %r unavailable: %s", backend, err)
            raise ServiceError(503, "backend_unavailable", str(err)) from None
        except Exception as err:
            logger.exception("backend %r failed", backend)
            raise ServiceError(
                500, "backend_error", f"Backend {backend!r} failed: {type(err).__name__}: {err}"
            ) from None
        return {
            "samples": encode_bits(result.samples.cpu().numpy()),
            "info": _jsonable({**result.info, "backend": backend}),
        }

    return app
