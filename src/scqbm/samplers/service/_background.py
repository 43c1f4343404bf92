"""Run the sampling service in a background thread (tests, benchmarks, notebooks)."""

from __future__ import annotations

import threading
import time
from typing import Any

from ._app import create_app
from ._limits import ServiceLimits


class BackgroundServer:
    """A uvicorn server for an app, in a daemon thread of this process.

    Parameters
    ----------
    app
        The ASGI app (see :func:`create_app`).
    limits
        Connection limits and timeouts (:class:`ServiceLimits`); default: the app's.
    host
        Interface to bind; loopback by default.
    port
        Port; 0 picks a free one (read it from :attr:`url`).
    token
        The app's token, kept here for the caller's convenience.

    """

    def __init__(
        self,
        app,
        host: str = "127.0.0.1",
        port: int = 0,
        token: str | None = None,
        limits: ServiceLimits | None = None,
    ):
        from ._server import make_server

        self.host, self.token, self.app = host, token, app
        limits = limits or ServiceLimits()
        # Worker processes first: their pipes count against the file limit the connection
        # cap is computed from.
        pool = getattr(getattr(app, "state", None), "pool", None)
        if pool is not None:
            pool.start()
        self._server = make_server(
            app, limits, host=host, port=port, log_level="warning", lifespan="off"
        )
        self._thread: threading.Thread | None = None
        self.port: int | None = None

    @property
    def url(self) -> str:
        """Base URL of the running server."""
        if self.port is None:
            raise RuntimeError("The server is not running.")
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 20.0) -> BackgroundServer:
        """Start serving and wait until the socket accepts connections."""
        self._thread = threading.Thread(target=self._server.run, daemon=True, name="scqbm-sampler")
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"The sampling service did not start on {self.host}.")
            time.sleep(0.01)
        self.port = self._server.servers[0].sockets[0].getsockname()[1]
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop accepting requests and wait for the server thread to end."""
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
        pool = getattr(getattr(self.app, "state", None), "pool", None)
        if pool is not None:
            pool.close()

    def __enter__(self) -> BackgroundServer:
        return self if self.port is not None else self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def serve_in_background(
    backend: str = "gibbs",
    backend_kwargs: dict[str, Any] | None = None,
    *,
    token: str | None = None,
    limits: ServiceLimits | None = None,
    allow_no_token: bool = False,
    device: str = "cpu",
    host: str = "127.0.0.1",
    port: int = 0,
) -> BackgroundServer:
    """Start :func:`create_app` for ``backend`` in a background thread and return the server.

    Use it as a context manager, or call ``stop()``; ``server.url`` is the client's ``url``.
    """
    app = create_app(
        backend,
        backend_kwargs,
        token=token,
        limits=limits,
        allow_no_token=allow_no_token,
        device=device,
    )
    return BackgroundServer(app, host=host, port=port, token=token, limits=limits).start()
