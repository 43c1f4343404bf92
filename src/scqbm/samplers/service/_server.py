"""The HTTP server of the sampling service: uvicorn with connection limits and timeouts.

uvicorn alone holds a connection open for as long as the client likes before its first
request, has no cap on connections, and when the process runs out of file descriptors
asyncio logs a traceback for every failed ``accept()``. Here a connection gets
``header_timeout`` seconds to send its request head (and may not linger longer than that
without a request in progress), at most ``connection_cap()`` connections are open (at the
cap the oldest idle one is closed for the newcomer, so a flood of idle sockets cannot lock
out real clients), and out-of-resource accept errors are logged once a minute with a count.
The warning uvicorn logs for every malformed HTTP request is rate-limited the same way (one
line per message every ``LOG_INTERVAL`` seconds, with the number suppressed).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from ._limits import ServiceLimits
from ._ratelog import LOG_INTERVAL, RateLimitedLog

logger = logging.getLogger(__name__)

#: Seconds between two log lines about failed accept() calls.
ACCEPT_LOG_INTERVAL = 60.0
#: Connections asyncio accepts in one go before ``connection_made`` runs for any of them
#: (its accept loop takes up to ``backlog``): small, so the connection cap can make room
#: before the file limit is hit. Inside the FD reserve of ``ServiceLimits``.
ACCEPT_BATCH = 16
#: The kernel's queue of connections waiting to be accepted.
LISTEN_BACKLOG = 2048


class _Connections:
    """The open connections of one server, oldest first."""

    def __init__(self, cap: int):
        self.cap = cap
        self.open: dict[H11Protocol, None] = {}  # insertion-ordered set
        self.evicted = 0

    def admit(self, protocol: H11Protocol) -> bool:
        """Make room for ``protocol``; ``False`` if every open connection is busy."""
        if len(self.open) >= self.cap:
            idle = next((p for p in self.open if not _busy(p)), None)
            if idle is None:
                return False
            self.evicted += 1
            self.discard(idle)
            idle.transport.abort()  # frees its file descriptor now
        self.open[protocol] = None
        return True

    def discard(self, protocol: H11Protocol) -> None:
        self.open.pop(protocol, None)


def _busy(protocol: H11Protocol) -> bool:
    """A request head has arrived and its response is not complete."""
    return protocol.cycle is not None and not protocol.cycle.response_complete


def guarded_protocol(limits: ServiceLimits) -> type[H11Protocol]:
    """An ``H11Protocol`` class enforcing ``limits``' connection cap and header timeout."""
    connections = _Connections(limits.connection_cap())
    header_timeout = limits.header_timeout
    # uvicorn warns once per malformed request ("Invalid HTTP request received."): shared by
    # every connection, so a client looping on garbage yields one line per LOG_INTERVAL.
    quiet = RateLimitedLog(logging.getLogger("uvicorn.error"), LOG_INTERVAL)

    class GuardedH11Protocol(H11Protocol):
        _connections = connections
        malformed_log = quiet

        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.logger = quiet

        def connection_made(self, transport) -> None:  # type: ignore[override]
            self._header_timer: asyncio.TimerHandle | None = None
            super().connection_made(transport)
            if not connections.admit(self):
                self._refuse(transport)
                return
            self._arm_header_timer()

        def _refuse(self, transport) -> None:
            body = _error_body("too_many_connections", "All connections are busy; retry later.")
            transport.write(
                b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
                b"retry-after: 1\r\nconnection: close\r\ncontent-length: "
                + str(len(body)).encode()
                + b"\r\n\r\n"
                + body
            )
            transport.close()

        def _arm_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
            self._header_timer = self.loop.call_later(header_timeout, self._on_header_timeout)

        def _on_header_timeout(self) -> None:
            self._header_timer = None
            if not _busy(self) and not self.transport.is_closing():
                self.transport.close()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if _busy(self) and self._header_timer is not None:
                self._header_timer.cancel()  # the app's body timeout takes over
                self._header_timer = None

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm_header_timer()  # the next request head must come in time too

        def connection_lost(self, exc) -> None:
            connections.discard(self)
            if self._header_timer is not None:
                self._header_timer.cancel()
            super().connection_lost(exc)

        def send_400_response(self, msg: str) -> None:
            # Unparseable HTTP still gets the service's one JSON error shape.
            body = _error_body("bad_http", msg)
            headers = [
                (b"content-type", b"application/json"),
                (b"connection", b"close"),
                (b"content-length", str(len(body)).encode()),
            ]
            try:
                for event in (
                    h11.Response(status_code=400, headers=headers, reason=b"Bad Request"),
                    h11.Data(data=body),
                    h11.EndOfMessage(),
                ):
                    self.transport.write(self.conn.send(event))
            except h11.LocalProtocolError:  # the connection is past a response already
                pass
            self.transport.close()

    return GuardedH11Protocol


def _error_body(code: str, message: str) -> bytes:
    return json.dumps({"error": {"code": code, "message": message}}).encode()


class _AcceptErrorFilter:
    """Loop exception handler: out-of-resource accept errors once a minute, with a count."""

    def __init__(self):
        self.suppressed, self._last = 0, -float("inf")

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if "out of system resource" not in str(context.get("message", "")):
            loop.default_exception_handler(context)
            return
        now = time.monotonic()
        if now - self._last < ACCEPT_LOG_INTERVAL:
            self.suppressed += 1
            return
        logger.error(
            "Cannot accept connections: %s (%d more since the last report). The process is "
            "out of file descriptors; raise `ulimit -n` or lower --max-connections.",
            context.get("exception"),
            self.suppressed,
        )
        self.suppressed, self._last = 0, now


def make_server(app, limits: ServiceLimits, **config_kwargs):
    """A ``uvicorn.Server`` for ``app`` with ``limits``' connection guards and timeouts."""
    import uvicorn

    class _Server(uvicorn.Server):
        async def startup(self, sockets=None) -> None:
            asyncio.get_running_loop().set_exception_handler(_AcceptErrorFilter())
            await super().startup(sockets)
            # asyncio listens with its accept batch as backlog; the kernel may queue more.
            for server in self.servers:
                for sock in server.sockets:
                    with sock.dup() as listener:
                        listener.listen(LISTEN_BACKLOG)

    config = uvicorn.Config(
        app,
        http=guarded_protocol(limits),
        timeout_keep_alive=limits.keep_alive_timeout,
        backlog=ACCEPT_BATCH,
        **config_kwargs,
    )
    return _Server(config)
