"""The ``remote`` backend: sample through a ``scqbm serve-sampler`` service over HTTP."""

from __future__ import annotations

import json
import logging
import math
import os
import random
import threading
import time

import torch

from ._base import DEFAULT_NUM_READS, BoltzmannSampler, SamplerError, SamplerUnavailable
from ._errors import SamplerNotInstalled
from ._gibbs import GibbsSampler
from ._wire import API_PREFIX, TOKEN_ENV, ProtocolError, decode_bits, encode_array

logger = logging.getLogger(__name__)

_INSTALL_HINT = "pip install 'scqbm[service]'"
#: Statuses worth retrying: the service is busy, restarting or failed transiently.
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})


#: Statuses that mean the client is configured wrongly (token); retrying cannot help.
AUTH_STATUSES = frozenset({401, 403})
#: Reply bytes allowed beyond the packed samples (JSON, base64 overhead and ``info``).
_REPLY_SLACK = 1 << 20


class ServiceUnavailable(SamplerUnavailable):
    """The sampling service could not be reached, failed or answered malformed data."""


class ServiceConfigurationError(SamplerError):
    """The service refused the client's credentials (HTTP 401/403): fix the token."""


def _number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _numbers(value) -> bool:
    # NaN travels as null (e.g. a swap rate with no attempts).
    return isinstance(value, list) and all(v is None or _number(v) for v in value)


def _short_text(value) -> bool:
    return isinstance(value, str) and len(value) <= 200


def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


#: ``info`` keys a service may send, with their checks. Other keys are dropped: a reply
#: must not be able to add counters (``fallback``) to the training history.
INFO_SCHEMA = {
    "backend": _short_text,
    "sampler": _short_text,
    "seconds": _number,
    "queue_seconds": _number,
    "worker_seconds": _number,
    "persistent": lambda v: isinstance(v, bool),
    "sweeps": _count,
    "spin_updates": _count,
    "chunks": _count,
    "solves": _count,
    "ising_spins": _count,
    "betas": _numbers,
    "swap_acceptance": _numbers,
    "beta_range": _numbers,
    "precision_scale": lambda v: v is None or _number(v),
    "effective_beta": lambda v: _number(v) and math.isfinite(v) and v > 0,
}


def validate_info(info) -> dict:
    """The allowed keys of a reply's ``info``; ``ProtocolError`` for a wrong type."""
    if not isinstance(info, dict):
        raise ProtocolError(f"`info` must be an object, got {type(info).__name__}.")
    checked = {}
    for key, value in info.items():
        check = INFO_SCHEMA.get(key)
        if check is None:
            continue  # unknown keys are dropped, not trusted
        if not check(value):
            raise ProtocolError(f"`info.{key}` has an invalid value {str(value)[:80]!r}.")
        checked[key] = value
    return checked


class RemoteSampler(BoltzmannSampler):
    """Draw samples from a sampling service (``scqbm serve-sampler``) over HTTP.

    Each call sends the problem (base64 ``float32`` or ``float64`` arrays) to
    ``POST {url}/v1/sample`` with the token as ``Authorization: Bearer``. Connection errors,
    timeouts and statuses 429 and 5xx are retried with exponential backoff (``backoff * 2^k``
    seconds, at most ``max_backoff``, with jitter), and so are malformed replies: every reply
    is checked strictly (exact byte length for the declared shape, integer shape equal to the
    requested reads and units, no stray bits, only known ``info`` keys with the right types;
    unknown keys are dropped). A 401 or 403 is a configuration error (no or a wrong token)
    and raises :class:`ServiceConfigurationError` at once, also under ``"fallback"``; other
    4xx answers (request over the service's limits, invalid problem) raise
    :class:`~scqbm.samplers.SamplerError` at once, since repeating them cannot help.

    When the service stays unavailable or keeps answering malformed data, ``on_failure``
    decides: ``"raise"`` raises
    :class:`ServiceUnavailable`; ``"fallback"`` draws from a local persistent
    :class:`~scqbm.samplers.GibbsSampler` instead, logs a warning, counts the call in
    :attr:`fallbacks` and marks it with ``info["fallback"] = 1`` (the training plan logs the
    count per epoch as ``sampler_fallbacks``). After a failure the service is left alone for
    ``retry_after`` seconds, so an outage does not add the retry delays to every training step.

    Parameters
    ----------
    n_units
        Number of binary units.
    url
        Base URL of the service, e.g. ``"http://127.0.0.1:8765"``.
    token
        The service's token; default: the environment variable ``SCQBM_SAMPLER_TOKEN``, read
        at each request. A token given here is never saved with a model (``QBMVAE.save``
        strips it); a loaded model reads the environment variable.
    num_chains
        Reads per negative phase: the declared ``properties["num_reads"]``, so the model asks
        for this many per training step (``None``: the model's ``num_negative_samples``). The
        service runs fresh chains per request, so ``properties["persistent"]`` is ``False``.
    timeout
        Seconds to wait for a response (sampling included).
    connect_timeout
        Seconds to wait for a connection.
    max_retries
        Retries after the first attempt.
    backoff, max_backoff
        Base and cap of the exponential backoff, in seconds.
    on_failure
        ``"raise"`` or ``"fallback"``.
    retry_after
        Seconds during which calls fall back without trying the service after a failure.
    fallback_kwargs
        Arguments of the fallback :class:`~scqbm.samplers.GibbsSampler`.
    dtype
        Precision of the arrays sent, and at which the service samples: ``"float32"`` (half
        the bytes, and the precision a prior trains in) or ``"float64"``.

    """

    name = "remote"

    def __init__(
        self,
        n_units: int,
        url: str,
        token: str | None = None,
        num_chains: int | None = 512,
        timeout: float = 60.0,
        connect_timeout: float = 5.0,
        max_retries: int = 3,
        backoff: float = 0.5,
        max_backoff: float = 8.0,
        on_failure: str = "raise",
        retry_after: float = 30.0,
        fallback_kwargs: dict | None = None,
        dtype: str = "float32",
    ):
        super().__init__()
        if on_failure not in ("raise", "fallback"):
            raise ValueError(f"`on_failure` must be 'raise' or 'fallback', got {on_failure!r}.")
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"`url` must start with http:// or https://, got {url!r}.")
        if max_retries < 0 or backoff < 0 or timeout <= 0 or connect_timeout <= 0:
            raise ValueError(
                "RemoteSampler needs max_retries >= 0, backoff >= 0 and positive timeouts."
            )
        if num_chains is not None and (
            isinstance(num_chains, bool) or int(num_chains) != num_chains or num_chains < 1
        ):
            raise ValueError(f"`num_chains` must be a positive integer or None, got {num_chains}.")
        if dtype not in ("float32", "float64"):
            raise ValueError(f"`dtype` must be 'float32' or 'float64', got {dtype!r}.")
        self.n_units = n_units
        self.url = url.rstrip("/")
        self.token = token
        self.num_chains = None if num_chains is None else int(num_chains)
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.max_retries = max_retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.on_failure = on_failure
        self.retry_after = retry_after
        self.dtype = dtype
        # A submodule, so its persistent chains are saved with the model and move with it.
        self.fallback = (
            GibbsSampler(
                n_units, num_chains=self.num_chains or DEFAULT_NUM_READS, **(fallback_kwargs or {})
            )
            if on_failure == "fallback"
            else None
        )
        #: Calls answered by the fallback sampler since construction.
        self.fallbacks = 0
        self._down_until = 0.0
        self._client = None
        self._client_lock = threading.Lock()

    def random_state(self) -> dict:
        # The service's randomness is the server's; the local fallback's is ours.
        return {} if self.fallback is None else {"fallback": self.fallback.random_state()}

    def set_random_state(self, state: dict) -> None:
        if "fallback" in state:
            self.fallback.set_random_state(state["fallback"])

    @property
    def parameters(self) -> dict[str, list]:
        # Sent to the service as they are; backend options are the server's.
        return {"num_reads": ["num_reads"], "n_visible": []}

    @property
    def properties(self) -> dict:
        # The service runs fresh chains per request; the fallback's chains are local only.
        return {"persistent": False, "num_reads": self.num_chains}

    def preflight(self) -> None:
        """Check that the HTTP client (httpx) imports; the service is not contacted."""
        _import_httpx()

    # ------------------------------------------------------------------ HTTP
    def _http(self):
        with self._client_lock:
            if self._client is None:
                httpx = _import_httpx()
                timeout = httpx.Timeout(self.timeout, connect=self.connect_timeout)
                self._client = httpx.Client(timeout=timeout)
            return self._client

    def _headers(self) -> dict:
        headers = {"Content-Type": "application/json"}
        token = self.token or os.environ.get(TOKEN_ENV)
        if token:
            headers["Authorization"] = f"Bearer {token}"
        return headers

    def _delay(self, attempt: int, response=None) -> float:
        delay = min(self.max_backoff, self.backoff * 2**attempt)
        retry_after = response.headers.get("retry-after") if response is not None else None
        if retry_after is not None and retry_after.isdigit():
            delay = min(self.max_backoff, max(delay, float(retry_after)))
        # Jitter spreads the retries of many clients hit by the same outage.
        return delay * (0.5 + 0.5 * random.random())

    def request(self, h: torch.Tensor, W: torch.Tensor, num_reads: int, n_visible: int | None):
        """One sampling request with retries; returns ``(samples, info)`` as numpy and dict.

        Raises
        ------
        ServiceUnavailable
            No usable answer (unreachable, 429/5xx, malformed reply) after ``max_retries``
            retries.
        ServiceConfigurationError
            The service refused the token (401/403).
        SamplerError
            The service refused the request (another 4xx).

        """
        client = self._http()  # first: it raises the install hint when httpx is missing
        import httpx

        body = json.dumps(
            {
                "h": encode_array(h.detach().cpu().numpy(), self.dtype),
                "W": encode_array(W.detach().cpu().numpy(), self.dtype),
                "num_reads": int(num_reads),
                "n_visible": n_visible,
            }
        ).encode()
        endpoint = f"{self.url}{API_PREFIX}/sample"
        shape = (int(num_reads), int(h.shape[0]))
        limit = shape[0] * (-(-shape[1] // 8)) * 4 // 3 + _REPLY_SLACK
        failure = ""
        for attempt in range(self.max_retries + 1):
            response = None
            try:
                request = client.build_request(
                    "POST", endpoint, content=body, headers=self._headers()
                )
                response = client.send(request, stream=True)
                try:
                    content = _read_limited(response, limit)
                finally:
                    response.close()
            except httpx.TransportError as err:  # connection refused or reset, timeouts
                failure = f"{type(err).__name__}: {err}"
            except ProtocolError as err:  # a reply far larger than the samples asked for
                failure = f"malformed answer: {err}"
            else:
                status = response.status_code
                if status < 400:
                    try:
                        return self._decode(content, shape, attempt, len(body))
                    except ProtocolError as err:
                        failure = f"malformed answer: {err}"
                        logger.warning(
                            "Malformed answer from the sampling service at %s (attempt %d): %s",
                            self.url,
                            attempt + 1,
                            err,
                        )
                else:
                    message = _error_message(content, response.reason_phrase)
                    if status in AUTH_STATUSES:
                        raise ServiceConfigurationError(
                            f"Configuration error: the sampling service at {self.url} refused "
                            f"the token (HTTP {status}): {message} Set the service's token in "
                            f"${TOKEN_ENV} (or the sampler's `token`). Not retried and no "
                            "fallback: a wrong token cannot be fixed by waiting."
                        )
                    if status not in RETRY_STATUSES:
                        raise SamplerError(
                            f"The sampling service at {self.url} refused the request "
                            f"(HTTP {status}): {message}"
                        )
                    failure = f"HTTP {status}: {message}"
            if attempt < self.max_retries:
                time.sleep(self._delay(attempt, response))
        raise ServiceUnavailable(
            f"The sampling service at {self.url} failed {self.max_retries + 1} attempts; "
            f"last error: {failure}"
        )

    def _decode(self, content: bytes, shape, attempt, payload_bytes):
        """Samples and checked info of a reply; ``ProtocolError`` for anything malformed."""
        try:
            answer = json.loads(content)
        except (ValueError, RecursionError) as err:
            raise ProtocolError(f"the reply is not JSON ({type(err).__name__})") from None
        if not isinstance(answer, dict) or "samples" not in answer:
            raise ProtocolError("the reply has no `samples`.")
        samples = decode_bits(answer["samples"], shape)
        info = validate_info(answer.get("info", {}))
        # The service's own wall time; this call's (network included) is info["seconds"].
        info["server_seconds"] = info.pop("seconds", None)
        info.pop("sampler", None)
        info.update(url=self.url, attempts=attempt + 1, payload_bytes=payload_bytes)
        return samples, info

    # -------------------------------------------------------------- sampling
    def _sample(self, h, W, num_reads, n_visible):
        if self.fallback is not None and time.monotonic() < self._down_until:
            return self._fall_back(h, W, num_reads, n_visible, "the service failed recently")
        try:
            samples, info = self.request(h, W, num_reads, n_visible)
        except ServiceUnavailable as err:
            if self.fallback is None:
                raise
            self._down_until = time.monotonic() + self.retry_after
            return self._fall_back(h, W, num_reads, n_visible, str(err))
        if self._down_until:
            logger.warning(
                "Sampling service at %s is back after %d fallback calls.", self.url, self.fallbacks
            )
            self._down_until = 0.0
        return torch.as_tensor(samples, dtype=h.dtype, device=h.device), info

    def _fall_back(self, h, W, num_reads, n_visible, reason):
        self.fallbacks += 1
        # Every fallback is counted in the history; the log says when it starts, then rarely.
        if self.fallbacks == 1 or self.fallbacks % 100 == 0:
            logger.warning(
                "Sampling service at %s unavailable (%s); drawing from local Gibbs chains "
                "instead (fallback call %d).",
                self.url,
                reason,
                self.fallbacks,
            )
        result = self.fallback.sample(h, W, num_reads, n_visible=n_visible, check=False)
        info = {k: v for k, v in result.info.items() if k not in ("seconds", "sampler")}
        return result.samples, {**info, "backend": "gibbs", "fallback": 1, "url": self.url}

    # ------------------------------------------------------------- plumbing
    def close(self) -> None:
        """Close the HTTP connection pool."""
        with self._client_lock:
            if self._client is not None:
                self._client.close()
                self._client = None

    def __getstate__(self):
        # Connection pools and locks do not pickle; they are rebuilt on first use.
        state = self.__dict__.copy()
        state["_client"] = None
        state["_client_lock"] = None
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self._client_lock = threading.Lock()

    def extra_repr(self) -> str:
        return (
            f"n_units={self.n_units}, url={self.url!r}, on_failure={self.on_failure!r}, "
            f"max_retries={self.max_retries}, fallbacks={self.fallbacks}"
        )


def _import_httpx():
    try:
        import httpx
    except ImportError as err:
        raise SamplerNotInstalled(f"The 'remote' sampler needs httpx: {_INSTALL_HINT}") from err
    return httpx


def _read_limited(response, limit: int) -> bytes:
    """The reply body, or ``ProtocolError`` once it exceeds ``limit`` bytes."""
    chunks, size = [], 0
    for chunk in response.iter_bytes():
        size += len(chunk)
        if size > limit:
            raise ProtocolError(f"the reply exceeds {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _error_message(content: bytes, reason: str) -> str:
    """The service's ``error.message``, or the start of the body."""
    try:
        return str(json.loads(content)["error"]["message"])[:500]
    except (ValueError, KeyError, TypeError, RecursionError):
        return content[:300].decode("utf-8", "replace") or reason
