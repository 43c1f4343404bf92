"""The ``remote`` backend: sample through a ``scqbm serve-sampler`` service over HTTP."""

from __future__ import annotations

import json
import logging
import os
import random
import threading
import time

import torch

from ._base import BoltzmannSampler, SamplerError
from ._gibbs import GibbsSampler
from .service._protocol import API_PREFIX, TOKEN_ENV, ProtocolError, decode_bits, encode_array

logger = logging.getLogger(__name__)

_INSTALL_HINT = "pip install 'scqbm[service]'"
#: Statuses worth retrying: the service is busy, restarting or failed transiently.
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})


class ServiceUnavailable(SamplerError):
    """The sampling service could not be reached or failed after every retry."""


class RemoteSampler(BoltzmannSampler):
    """Draw samples from a sampling service (``scqbm serve-sampler``) over HTTP.

    Each call sends the problem (base64 ``float32`` or ``float64`` arrays) to
    ``POST {url}/v1/sample`` with the token as ``Authorization: Bearer``. Connection errors,
    timeouts and statuses 429 and 5xx are retried with exponential backoff (``backoff * 2^k``
    seconds, at most ``max_backoff``, with jitter); other 4xx answers (bad token, request over
    the service's limits, invalid problem) raise at once, since repeating them cannot help.

    When the service stays unavailable, ``on_failure`` decides: ``"raise"`` raises
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
        The service's token; default: the environment variable ``SCQBM_SAMPLER_TOKEN``. A
        token given here is stored with a saved model's constructor arguments; the environment
        variable is not.
    num_chains
        Reads per negative phase (the model asks for this many).
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
        Precision of the arrays sent: ``"float32"`` (half the bytes) or ``"float64"``.

    """

    name = "remote"

    def __init__(
        self,
        n_units: int,
        url: str,
        token: str | None = None,
        num_chains: int = 512,
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
        if dtype not in ("float32", "float64"):
            raise ValueError(f"`dtype` must be 'float32' or 'float64', got {dtype!r}.")
        self.n_units = n_units
        self.url = url.rstrip("/")
        self.token = token
        self.num_chains = num_chains
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
            GibbsSampler(n_units, num_chains=num_chains, **(fallback_kwargs or {}))
            if on_failure == "fallback"
            else None
        )
        #: Calls answered by the fallback sampler since construction.
        self.fallbacks = 0
        self._down_until = 0.0
        self._client = None
        self._client_lock = threading.Lock()

    # ------------------------------------------------------------------ HTTP
    def _http(self):
        with self._client_lock:
            if self._client is None:
                try:
                    import httpx
                except ImportError as err:
                    raise ImportError(
                        f"The 'remote' sampler needs httpx: {_INSTALL_HINT}"
                    ) from err
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
            No usable answer after ``max_retries`` retries.
        SamplerError
            The service refused the request (4xx other than 429) or answered malformed data.

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
        failure = ""
        for attempt in range(self.max_retries + 1):
            response = None
            try:
                response = client.post(endpoint, content=body, headers=self._headers())
            except httpx.TransportError as err:  # connection refused or reset, timeouts
                failure = f"{type(err).__name__}: {err}"
            else:
                if response.status_code < 400:
                    return self._decode(response, num_reads, h.shape[0], attempt, len(body))
                message = _error_message(response)
                if response.status_code not in RETRY_STATUSES:
                    raise SamplerError(
                        f"The sampling service at {self.url} refused the request "
                        f"(HTTP {response.status_code}): {message}"
                    )
                failure = f"HTTP {response.status_code}: {message}"
            if attempt < self.max_retries:
                time.sleep(self._delay(attempt, response))
        raise ServiceUnavailable(
            f"The sampling service at {self.url} failed {self.max_retries + 1} attempts; "
            f"last error: {failure}"
        )

    def _decode(self, response, num_reads, n, attempt, payload_bytes):
        try:
            answer = response.json()
            samples = decode_bits(answer["samples"])
            info = dict(answer.get("info") or {})
        except (ValueError, KeyError, TypeError, ProtocolError) as err:
            raise SamplerError(
                f"Malformed answer from the sampling service at {self.url}: {err}"
            ) from err
        if samples.shape != (num_reads, n):
            raise SamplerError(
                f"The sampling service at {self.url} returned samples of shape "
                f"{samples.shape}; ({num_reads}, {n}) were asked for."
            )
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
        result = self.fallback.sample(h, W, num_reads, n_visible=n_visible)
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


def _error_message(response) -> str:
    """The service's ``error.message``, or the start of the body."""
    try:
        return str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return response.text[:300] or response.reason_phrase
