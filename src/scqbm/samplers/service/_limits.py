"""Limits of the sampling service: request sizes, compute, time, queue and connections."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

#: File descriptors kept free of client connections (logs, sockets to the backend, imports).
FD_RESERVE = 64
#: Descriptors kept free beyond those open when the cap is computed (an accept batch, logs).
FD_HEADROOM = 64


@dataclass(frozen=True)
class ServiceLimits:
    """Request, compute, time and connection limits of the sampling service.

    Attributes
    ----------
    max_spins
        Largest number of units of a problem.
    max_reads
        Largest ``num_reads`` of one request.
    max_payload_bytes
        Largest request body; a 2048-unit ``W`` in float64 is 32 MiB, 43 MiB as base64.
    max_work
        Compute budget of one request in spin updates, ``units x reads x sweeps per read``
        (sweeps from the backend's settings, e.g. ``burn_in + num_sweeps`` for fresh Gibbs
        chains). The default allows 256 units x 1,024 reads x 128 sweeps; a request over it
        is refused with 413 ``too_much_work`` before any sampling.
    deadline_seconds
        Longest time a request may spend in the service (queue and sampling). Work still
        running then is abandoned and the client gets 503 ``deadline_exceeded``. Below the
        ``remote`` client's default ``timeout`` of 60 s, so a client hears why.
    workers
        Sampling threads. The native samplers release the GIL in their kernels, so threads
        run in parallel and the event loop keeps answering meanwhile. One more *express*
        thread runs only small requests (about 0.1 s of work), so a small request starts at
        once even when every worker is busy with big ones.
    max_queue
        Requests admitted at once (queued or running); one more gets 429 with a
        ``Retry-After`` estimated from the queued work.
    max_connections
        Open connections; at the cap a new connection closes the oldest connection that has
        no request in progress (an idle or stalled one), or is answered 503 if all are busy.
        Never more than the process's file limit (``RLIMIT_NOFILE``) minus the descriptors
        open when the server starts (worker processes' pipes included) and 64 more.
    header_timeout
        Seconds a connection may take to send a complete request head, and may then stay
        without a request in progress (slow or stalled clients are disconnected).
    body_timeout
        Seconds to receive the whole request body once its head has arrived (408 otherwise).
    keep_alive_timeout
        Seconds an idle keep-alive connection is kept open between requests.
    worker_kind
        Where the workers sample: ``"processes"`` (each worker thread hands its chunks to a
        child process of its own, so sampling does not hold the service's GIL and a small
        request behind big ones costs about what it costs alone), ``"threads"`` (in the
        service's process), or ``"auto"`` (default): processes for a backend without
        persistent chains on the CPU that a fresh interpreter can build (a registered
        built-in), threads otherwise. Children start with the server (a few seconds).

    """

    max_spins: int = 2048
    max_reads: int = 10_000
    max_payload_bytes: int = 64 * 2**20
    max_work: int = 256 * 1024 * 128
    deadline_seconds: float = 50.0
    workers: int = 2
    max_queue: int = 128
    max_connections: int = 512
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    keep_alive_timeout: float = 5.0
    worker_kind: str = "auto"

    def __post_init__(self):
        if self.worker_kind not in WORKER_KINDS:
            raise ValueError(
                f"ServiceLimits.worker_kind must be one of {list(WORKER_KINDS)}, got "
                f"{self.worker_kind!r}."
            )
        for name, value in asdict(self).items():
            if name == "worker_kind":
                continue
            number = isinstance(value, int | float) and not isinstance(value, bool)
            if not (number and value > 0) or (
                name in _INTEGER_FIELDS and not isinstance(value, int)
            ):
                kind = "integer" if name in _INTEGER_FIELDS else "number"
                raise ValueError(f"ServiceLimits.{name} must be a positive {kind}, got {value!r}.")

    def connection_cap(self) -> int:
        """``max_connections``, lowered to what the process's file limit allows."""
        try:
            import resource

            soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        except (ImportError, OSError, ValueError):  # no resource module on Windows
            return self.max_connections
        if soft == resource.RLIM_INFINITY:
            return self.max_connections
        # What the process holds already (worker processes' pipes, log files, libraries)
        # plus room for an accept batch, and never less than the fixed reserve.
        in_use = _open_file_descriptors()
        reserve = FD_RESERVE if in_use is None else max(FD_RESERVE, in_use + FD_HEADROOM)
        return max(1, min(self.max_connections, soft - reserve))


def _open_file_descriptors() -> int | None:
    """File descriptors this process has open, where the system says (Linux, macOS)."""
    for folder in ("/proc/self/fd", "/dev/fd"):
        try:
            return len(os.listdir(folder))
        except OSError:
            continue
    return None


#: Values of :attr:`ServiceLimits.worker_kind`.
WORKER_KINDS = ("auto", "processes", "threads")

_INTEGER_FIELDS = frozenset(
    {
        "max_spins",
        "max_reads",
        "max_payload_bytes",
        "max_work",
        "workers",
        "max_queue",
        "max_connections",
    }
)
