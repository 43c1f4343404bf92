"""The sampling service: a FastAPI app that serves one registered sampler backend over HTTP.

Every answer that is not a sample set is ``{"error": {"code", "message"}}`` with a 4xx status
for anything the client sent (never a 500 for a malformed request) and 503 when the service
cannot help now (backend unavailable, deadline passed; with ``Retry-After``) or 429 when its
queue is full.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import time
from dataclasses import asdict
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import numpy as np
import torch
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .._base import SamplerError, SamplerUnavailable, validate_problem
from .._registry import make_sampler
from .._wire import API_PREFIX, ProtocolError, decode_array, encode_bits
from ._limits import ServiceLimits
from ._pool import Cancelled, QueueFull, SamplingPool
from ._processes import BackendSpec, ProcessLane, spawnable
from ._ratelog import RateLimitedLog

logger = logging.getLogger(__name__)

#: Keys of backend arguments never echoed by ``/v1/info``.
_SECRET_WORDS = ("token", "code", "secret", "password", "user_id", "key")

__all__ = ["ServiceError", "ServiceLimits", "create_app"]


def _package_version() -> str:
    # Not `scqbm.__version__`: the service must not import the top package.
    try:
        return version("scqbm")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "unknown"


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


class _Backend:
    """The configured backend: how to build it per problem size and what one read costs.

    Everything comes from what the sampler declares (:class:`~scqbm.samplers.BoltzmannSampler`):
    ``properties["persistent"]`` decides whether requests are independent (and may be cut
    into chunks), :attr:`~scqbm.samplers.BoltzmannSampler.sweeps_per_read` prices a read for
    the compute budget, and :meth:`~scqbm.samplers.BoltzmannSampler.preflight` checks at
    startup that the backend can run here.
    """

    def __init__(self, name: str, kwargs: dict[str, Any], device: str):
        self.device = torch.device(device)
        try:  # an unusable device fails at startup, not on every request
            torch.empty(0, device=self.device)
        except (AssertionError, RuntimeError) as err:  # torch asserts on a missing CUDA
            raise ValueError(f"Device {device!r} is not usable here: {err}") from err
        kwargs = dict(kwargs)
        probe = make_sampler(name, 2, **kwargs)  # fails at startup on bad arguments
        if probe.properties["persistent"] and "persistent" not in kwargs:
            # Requests from different clients must not continue each other's Markov chains:
            # ask for fresh chains per call, unless the operator chose persistence explicitly.
            probe, kwargs = _without_persistence(name, kwargs, probe)
        self.stateless = not probe.properties["persistent"]
        self.name, self.kwargs = name, kwargs
        # What builds the backend, here and in a worker process alike.
        self.spec = BackendSpec.of(name, kwargs, str(self.device))
        self.sweeps = int(probe.sweeps_per_read)
        if self.sweeps < 1:
            raise ValueError(
                f"Backend {name!r} declares sweeps_per_read={self.sweeps}; it must be >= 1."
            )
        probe.preflight()

    def make(self, n_units: int):
        return self.spec.build(n_units)


def _process_lane(backends: _Backend, limits: ServiceLimits) -> ProcessLane | None:
    """The child processes the workers sample in, as ``limits.worker_kind`` asks."""
    kind = limits.worker_kind
    known = spawnable(backends.name)
    if kind == "processes" and not known:
        raise ValueError(
            f"Backend {backends.name!r} is registered at run time, so a worker process cannot "
            "build it: use worker_kind='threads' (--worker-kind threads)."
        )
    if kind == "threads" or (
        kind == "auto" and not (known and backends.stateless and backends.device.type == "cpu")
    ):
        return None
    return ProcessLane(backends.spec, limits.workers, required=kind == "processes")


def _without_persistence(name: str, kwargs: dict[str, Any], probe):
    """The backend built with ``persistent=False``, or ``probe`` if it has no such option."""
    try:
        fresh = make_sampler(name, 2, **kwargs, persistent=False)
    except TypeError:  # the registry rejects an option the backend does not have
        fresh = None
    if fresh is None or fresh.properties["persistent"]:
        logger.warning(
            "Backend %r declares persistent chains and has no `persistent` option: requests "
            "are sampled one at a time per worker and continue that worker's chains (for a "
            "wrapper, pass persistent=False in its backend_kwargs).",
            name,
        )
        return probe, kwargs
    return fresh, {**kwargs, "persistent": False}


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


async def _read_body(request: Request, limit: int, timeout: float) -> bytes:
    """The request body, refused with 413 as soon as it exceeds ``limit`` bytes.

    The whole body must arrive within ``timeout`` seconds (408 otherwise), so a client
    trickling bytes cannot hold a connection and a worker's memory indefinitely.
    """
    too_large = ServiceError(
        413,
        "payload_too_large",
        f"The request body exceeds this service's limit of {limit} bytes (max_payload_bytes).",
    )
    declared = request.headers.get("content-length")
    if declared is not None:
        if not (declared.isascii() and declared.isdigit()) or len(declared) > 20:
            raise ServiceError(400, "bad_request", "Invalid Content-Length header.")
        if int(declared) > limit:
            raise too_large
    chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:  # a chunked body has no Content-Length to check up front
                    raise too_large
                chunks.append(chunk)
    except TimeoutError:
        raise ServiceError(
            408,
            "body_timeout",
            f"The request body did not arrive within {timeout:g} s (body_timeout).",
        ) from None
    return b"".join(chunks)


def _parse(body: bytes, limits: ServiceLimits, sweeps: int):
    """Decode and check a sampling request; ``ServiceError`` with a 4xx status otherwise."""
    try:
        return _parse_checked(body, limits, sweeps)
    except ServiceError:
        raise
    except Exception as err:  # a malformed request is the client's error, never a 500
        logger.debug("unparseable request", exc_info=True)
        raise ServiceError(
            400, "bad_request", f"Malformed sampling request: {type(err).__name__}."
        ) from None


def _parse_checked(body: bytes, limits: ServiceLimits, sweeps: int):
    try:
        payload = json.loads(body)
    except RecursionError:
        raise ServiceError(400, "bad_json", "The request body is nested too deeply.") from None
    except (UnicodeDecodeError, ValueError) as err:  # JSONDecodeError; ints over 4300 digits
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
            422, "invalid_request", f"Invalid sampling request: {details}."[:2000]
        ) from None
    try:
        h = decode_array(request.h, "h")
        W = decode_array(request.W, "W")
    except ProtocolError as err:
        raise ServiceError(422, "invalid_request", str(err)) from None
    if h.ndim != 1 or h.shape[0] == 0:
        raise ServiceError(
            422,
            "invalid_problem",
            f"Expected h of shape (n,) with n >= 1 and W of shape (n, n); got h of shape "
            f"{list(h.shape)[:8]}.",
        )
    n = h.shape[0]
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
    work = n * request.num_reads * sweeps
    if work > limits.max_work:
        most = max(1, limits.max_work // (n * sweeps))
        raise ServiceError(
            413,
            "too_much_work",
            f"{n} units x {request.num_reads} reads x {sweeps} sweeps = {work} spin updates "
            f"exceeds this service's budget of {limits.max_work} (max_work); ask for at most "
            f"{most} reads per request.",
        )
    # Sample at the precision the client sent: float32 arrays (the `remote` client's default,
    # and the training prior's own precision) are sampled in float32, 3x faster than float64
    # on a 256-unit problem; JSON lists of numbers are doubles.
    single = all(
        isinstance(v, dict) and v.get("dtype") == "float32" for v in (request.h, request.W)
    )
    dtype = torch.float32 if single else torch.float64
    h, W = torch.from_numpy(h).to(dtype), torch.from_numpy(W).to(dtype)
    try:
        # The samplers' own check, bipartite structure included: block updates for an RBM
        # are wrong if the sides are coupled within themselves.
        validate_problem(h, W, n_visible=request.n_visible)
    except ValueError as err:
        raise ServiceError(422, "invalid_problem", str(err)) from None
    return h, W, request.num_reads, request.n_visible


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
        Its keyword arguments; validated at once by building the backend, whose
        :meth:`~scqbm.samplers.BoltzmannSampler.preflight` runs then too. A backend that
        declares persistent chains (``properties["persistent"]``) is built with
        ``persistent=False`` unless that option is given, because requests of different
        clients must not continue each other's chains. Requests to a backend without
        persistent chains are sampled in fair chunks (see
        :mod:`scqbm.samplers.service._pool`); the compute budget prices a read at the
        backend's :attr:`~scqbm.samplers.BoltzmannSampler.sweeps_per_read`.
    token
        Shared secret expected as ``Authorization: Bearer <token>``.
    limits
        Request, compute, queue and time limits (:class:`ServiceLimits`). The connection
        limits and header timeout apply when the app is served by
        :func:`~scqbm.samplers.service.serve_in_background` or ``scqbm serve-sampler``.
    allow_no_token
        Serve without authentication (``token=None``); refused otherwise.
    device
        Torch device the backend samples on (``"cuda"`` for the native samplers on a GPU).

    Returns
    -------
    The app: ``GET /v1/health`` (no authentication), ``GET /v1/info`` and
    ``POST /v1/sample`` (see :mod:`scqbm.samplers._wire`).

    """
    if not token and not allow_no_token:
        raise ValueError(
            "The sampling service needs a token: --token or $SCQBM_SAMPLER_TOKEN (token= in "
            "Python), or --allow-no-token (allow_no_token=True) on a trusted network."
        )
    limits = limits or ServiceLimits()
    backends = _Backend(backend, backend_kwargs or {}, device)
    pool = SamplingPool(
        backends.make,
        limits.workers,
        limits.max_queue,
        chunkable=backends.stateless,
        lane=_process_lane(backends, limits),
    )
    app_version = _package_version()
    app = FastAPI(title="scqbm sampling service", version=app_version)
    app.state.pool = pool
    # Lines caused by requests (a backend that cannot run, a bug every request hits): each
    # message at most once per LOG_INTERVAL seconds, with the number suppressed.
    request_log = app.state.request_log = RateLimitedLog(logger)

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
            headers=getattr(err, "headers", None),
        )

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, err: RequestValidationError):
        return JSONResponse(
            {"error": {"code": "invalid_request", "message": str(err.errors())[:2000]}},
            status_code=422,
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, err: Exception):
        # A bug, not a bad request: still the one error shape, and logged once.
        request_log.error("unexpected error on %s", request.url.path, exc_info=err)
        return JSONResponse(
            {"error": {"code": "internal_error", "message": type(err).__name__}},
            status_code=500,
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
            "sweeps_per_read": backends.sweeps,
            "device": str(backends.device),
            # Where the workers sample now (an "auto" lane that could not start: threads).
            "workers": pool.worker_kind,
            "limits": asdict(limits),
            "queue": pool.stats(),
            "version": app_version,
        }

    @app.post(f"{API_PREFIX}/sample", dependencies=[Depends(authenticate)])
    async def sample(request: Request):
        arrived = time.monotonic()
        body = await _read_body(request, limits.max_payload_bytes, limits.body_timeout)
        # Parsing a 40 MB body takes a while: off the event loop, which keeps serving.
        h, W, num_reads, n_visible = await run_in_threadpool(_parse, body, limits, backends.sweeps)
        del body
        deadline = arrived + limits.deadline_seconds
        try:
            job = pool.submit(h, W, num_reads, n_visible, backends.sweeps, deadline)
        except QueueFull as full:
            raise ServiceError(
                429,
                "queue_full",
                f"The service has {limits.max_queue} requests in progress (max_queue); "
                f"retry in about {full.retry_after:.0f} s.",
                {"Retry-After": str(int(full.retry_after))},
            ) from None
        samples, result_info = await _wait(request, job, deadline, limits, pool)
        return {
            "samples": encode_bits(samples.numpy()),
            "info": _jsonable({**result_info, "backend": backend}),
        }

    async def _wait(request, job, deadline, limits, pool):
        """The job's result; cancels it when the client disconnects or the deadline passes."""
        result = asyncio.wrap_future(job.future)
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            done, _ = await asyncio.wait(
                {result, gone},
                timeout=max(0.0, deadline - time.monotonic()),
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            gone.cancel()
        if result not in done:
            job.cancel()
            result.cancel()
            if gone in done:  # nobody will read this answer
                raise ServiceError(499, "client_closed", "The client closed the connection.")
            retry = int(pool.stats()["drain_seconds"])
            raise ServiceError(
                503,
                "deadline_exceeded",
                f"The request did not finish within {limits.deadline_seconds:g} s "
                "(deadline_seconds); the service is busy or the request is too large.",
                {"Retry-After": str(retry)},
            )
        try:
            return result.result()
        except Cancelled as err:
            raise ServiceError(
                503,
                "deadline_exceeded",
                f"The request was abandoned: {err}.",
                {"Retry-After": "1"},
            ) from None
        except ValueError as err:
            raise ServiceError(422, "invalid_problem", str(err)) from None
        except (SamplerUnavailable, ImportError) as err:
            # Any backend that cannot run here (package, licence, credentials, its own
            # service): the common root, not one backend's exception by name.
            request_log.error("backend %r unavailable: %s", backend, err)
            raise ServiceError(503, "backend_unavailable", str(err)) from None
        except SamplerError as err:
            request_log.error("backend %r failed: %s", backend, err)
            raise ServiceError(
                500, "backend_error", f"Backend {backend!r} failed: {type(err).__name__}: {err}"
            ) from None
        except Exception as err:
            request_log.exception("backend %r failed", backend)
            raise ServiceError(
                500, "backend_error", f"Backend {backend!r} failed: {type(err).__name__}: {err}"
            ) from None

    return app


async def _disconnected(request: Request) -> None:
    """Return when the client has closed the connection (the body is read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
