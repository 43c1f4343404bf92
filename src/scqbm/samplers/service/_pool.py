"""Worker pool of the sampling service: fair, bounded, cancellable sampling jobs.

A request becomes a :class:`Job`. When the backend draws independent reads (fresh chains
per request), a job is cut into chunks of a bounded amount of work (``chunk_cost``), and
each free worker runs the next chunk of the job with the least work left (shortest remaining
work first). A request therefore waits at most about one chunk behind a big one instead of
the whole big request, and a job whose client has gone, or whose deadline has passed, stops
at the next chunk boundary. Workers are threads. By default on CPU each hands its chunk to
a child process (:mod:`~scqbm.samplers.service._processes`) and waits, so that sampling
does not hold this interpreter's GIL; otherwise the threads sample themselves (the native
kernels release the GIL: numba ``nogil``, torch ops). Every worker (or child) keeps its own
backend instances, since samplers hold state (random generators) and are not thread-safe.

Every chunk pays the backend's fixed cost per call (measured: about 0.09 s for 101 sweeps of
a 256-unit dense problem, whatever the reads), so chunks must be large for throughput: at
42 reads per chunk a 256-unit, 512-read request paid it 13 times for 0.7 s of sampling.
Large chunks would make small requests wait, so besides the ``workers`` the pool has an
*express* thread that only takes requests of at most ``express_cost`` (about 0.1 s of
work): when every worker is busy with big requests, a small one starts at once instead of
waiting for a chunk to end. It sits idle otherwise; at most ``workers + express`` threads
sample at a time.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ._processes import ProcessLane

logger = logging.getLogger(__name__)

#: Work per chunk in the scheduling cost model (about 0.5 s of dense Gibbs on one core):
#: the granularity of fairness between big requests and of cancellation.
CHUNK_COST = 2e9
#: Largest request the express lane takes (about 0.1 s of dense Gibbs on one core).
EXPRESS_COST = 4e8
#: Work per second per worker assumed for ``Retry-After`` before any chunk was timed.
DEFAULT_RATE = 4e9
#: Fixed cost of one sweep of a chunk, whatever its reads (kernel call, validation): on a
#: 10-unit problem one read per chunk made a sweep ~200x dearer than its arithmetic.
SWEEP_OVERHEAD = 5e5


class QueueFull(Exception):
    """The pool has ``max_queue`` jobs; ``retry_after`` estimates when it has room."""

    def __init__(self, retry_after: float):
        super().__init__(f"queue full, retry after {retry_after:.0f} s")
        self.retry_after = retry_after


class Cancelled(Exception):
    """The job was cancelled (client gone) or ran past its deadline."""


def read_cost(n_units: int, sweeps: int) -> float:
    """Scheduling cost of one read: a sweep updates ``n`` units, each touching ~``n`` couplings.

    The ``+ 64`` is the per-update overhead that dominates on small problems (measured:
    64 units cost 5x less per read than 256, not 16x).
    """
    return float(sweeps) * n_units * (n_units + 64)


def chunk_reads(n_units: int, sweeps: int, chunk_cost: float) -> int:
    """Reads per chunk so that a chunk, its per-sweep overhead included, costs ``chunk_cost``."""
    per_sweep = chunk_cost / sweeps - SWEEP_OVERHEAD
    return max(1, int(per_sweep // (n_units * (n_units + 64))))


@dataclass(eq=False)
class Job:
    """One sampling request in the pool."""

    h: torch.Tensor
    W: torch.Tensor
    num_reads: int
    n_visible: int | None
    cost_per_read: float
    chunk_reads: int
    deadline: float
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    order: int = 0
    assigned: int = 0  # reads handed to workers
    done: int = 0  # reads finished
    chunks: dict = field(default_factory=dict)  # offset -> (samples, info)
    cancelled: bool = False
    started: float | None = None
    created: float = field(default_factory=time.monotonic)

    @property
    def remaining_cost(self) -> float:
        return (self.num_reads - self.assigned) * self.cost_per_read

    def cancel(self) -> None:
        """Stop at the next chunk boundary (the client is gone or the deadline passed)."""
        self.cancelled = True


class SamplingPool:
    """Threads that run sampling jobs in fair, bounded chunks.

    Parameters
    ----------
    make_sampler
        ``make_sampler(n_units)`` builds a backend instance (called once per worker and size).
    workers
        Number of worker threads.
    max_queue
        Jobs admitted at once; :meth:`submit` raises :class:`QueueFull` beyond.
    chunkable
        Whether reads are independent across calls (fresh chains), so a job may be split.
    chunk_cost
        Work of one chunk in :func:`read_cost` units.
    max_cached
        Backend instances kept per worker (one per problem size).
    express
        Extra threads that only run requests of at most ``express_cost`` (see the module
        docstring).
    express_cost
        Largest request, in :func:`read_cost` units, that the express threads take.
    lane
        Child processes (:class:`~scqbm.samplers.service._processes.ProcessLane`) that run
        the workers' chunks; ``None``: the worker threads sample themselves. The express
        threads always sample in this process (a small request must not pay the trip).

    """

    def __init__(
        self,
        make_sampler: Callable[[int], torch.nn.Module],
        workers: int,
        max_queue: int,
        chunkable: bool,
        chunk_cost: float = CHUNK_COST,
        max_cached: int = 4,
        express: int = 1,
        express_cost: float = EXPRESS_COST,
        lane: ProcessLane | None = None,
    ):
        self._make_sampler, self.max_queue = make_sampler, max_queue
        self.lane = lane
        self.chunkable, self.chunk_cost, self.max_cached = chunkable, chunk_cost, max_cached
        self.express_cost = express_cost
        self._jobs: list[Job] = []
        self._cond = threading.Condition()
        self._order = itertools.count()
        self._rate = None  # cost per second per worker, from finished chunks
        self._closed = False
        self._threads = [
            threading.Thread(target=self._work, name=f"scqbm-sampler-{i}", daemon=True)
            for i in range(workers)
        ]
        express_threads = [
            threading.Thread(
                target=self._work, args=(True,), name=f"scqbm-sampler-express-{i}", daemon=True
            )
            for i in range(express)
        ]
        self._all_threads = [*self._threads, *express_threads]
        for thread in self._all_threads:
            thread.start()

    def start(self) -> None:
        """Start the worker processes now, if there are any (otherwise on the first chunk).

        Raises when required processes cannot start; an optional lane falls back to threads.
        """
        if self.lane is not None:
            self.lane.available()

    @property
    def worker_kind(self) -> str:
        """Where the workers sample now: ``"processes"`` or ``"threads"``."""
        return "processes" if self.lane is not None and self.lane.usable else "threads"

    # ------------------------------------------------------------ submission
    def submit(self, h, W, num_reads: int, n_visible, sweeps: int, deadline: float) -> Job:
        """Queue a job; raises :class:`QueueFull` when ``max_queue`` jobs are admitted."""
        cost = read_cost(h.shape[0], sweeps)
        chunk = chunk_reads(h.shape[0], sweeps, self.chunk_cost) if self.chunkable else num_reads
        job = Job(h, W, num_reads, n_visible, cost, min(chunk, num_reads), deadline)
        with self._cond:
            if len(self._jobs) >= self.max_queue:
                raise QueueFull(self._drain_seconds())
            job.order = next(self._order)
            self._jobs.append(job)
            self._cond.notify_all()  # the express lane must not take the wake-up of a big job
        return job

    def _drain_seconds(self) -> float:
        work = sum(job.remaining_cost for job in self._jobs)
        rate = (self._rate or DEFAULT_RATE) * len(self._threads)
        return max(1.0, math.ceil(work / rate))

    def stats(self) -> dict:
        """Jobs admitted and the estimated seconds to finish their queued work."""
        with self._cond:
            return {"jobs": len(self._jobs), "drain_seconds": self._drain_seconds()}

    def close(self, timeout: float = 10.0) -> None:
        """Stop the workers after their current chunk; pending jobs are cancelled.

        Waits up to ``timeout`` seconds for the threads to end, so that none is still
        inside a kernel when the interpreter shuts down.
        """
        with self._cond:
            self._closed = True
            for job in list(self._jobs):
                job.cancel()
                self._finish(job, Cancelled("the sampling service is shutting down"))
            self._cond.notify_all()
        deadline = time.monotonic() + timeout
        if self.lane is not None:
            self.lane.close()  # also wakes workers waiting on a child's chunk
        for thread in self._all_threads:
            if thread is not threading.current_thread():
                thread.join(max(0.0, deadline - time.monotonic()))

    # -------------------------------------------------------------- workers
    def _small(self, job: Job) -> bool:
        """A job the express lane may take: not started and at most ``express_cost``."""
        return job.assigned == 0 and job.num_reads * job.cost_per_read <= self.express_cost

    def _next_chunk(self, express: bool = False):
        """The next ``(job, offset, reads)``: shortest remaining work first, then FIFO.

        With ``express``, only small jobs not yet started (:meth:`_small`).
        """
        now = time.monotonic()
        for job in list(self._jobs):
            if job.cancelled or now > job.deadline:
                reason = "cancelled" if job.cancelled else "deadline passed"
                self._finish(job, Cancelled(reason))
        ready = [
            job
            for job in self._jobs
            if job.assigned < job.num_reads and (not express or self._small(job))
        ]
        if not ready:
            return None
        job = min(ready, key=lambda j: (j.remaining_cost, j.order))
        reads = min(job.chunk_reads, job.num_reads - job.assigned)
        offset, job.assigned = job.assigned, job.assigned + reads
        if job.started is None:
            job.started = now
        return job, offset, reads

    def _finish(self, job: Job, error: BaseException | None = None, result=None) -> None:
        # Under the lock. A job leaves the queue exactly once.
        if job in self._jobs:
            self._jobs.remove(job)
        if job.future.done():
            return
        if error is not None:
            job.future.set_exception(error)
        else:
            job.future.set_result(result)

    def _work(self, express: bool = False) -> None:
        cache: OrderedDict[int, torch.nn.Module] = OrderedDict()
        while True:
            with self._cond:
                while not self._closed and (task := self._next_chunk(express)) is None:
                    self._cond.wait(timeout=1.0)  # wakes up to expire deadlines
                if self._closed:
                    return
            job, offset, reads = task
            start = time.perf_counter()
            try:
                if self.lane is not None and not express and self.lane.available():
                    result = self.lane.run(job.h, job.W, reads, job.n_visible)
                else:
                    result = self._run(cache, job, reads)
            except Exception as err:  # handed to the request, which answers it
                with self._cond:
                    job.cancel()
                    self._finish(job, err)
                continue
            seconds = time.perf_counter() - start
            with self._cond:
                rate = reads * job.cost_per_read / max(seconds, 1e-6)
                self._rate = rate if self._rate is None else 0.8 * self._rate + 0.2 * rate
                job.chunks[offset] = result
                job.done += reads
                if job.done == job.num_reads and not job.future.done():
                    self._finish(job, result=_merge(job))
                self._cond.notify_all()

    def _run(self, cache, job: Job, reads: int):
        n = job.h.shape[0]
        sampler = cache.pop(n, None)
        if sampler is None:
            sampler = self._make_sampler(n)
        cache[n] = sampler
        while len(cache) > self.max_cached:
            cache.popitem(last=False)
        with torch.no_grad():
            result = sampler.sample(job.h, job.W, reads, n_visible=job.n_visible)
        return result.samples.cpu(), result.info


#: Info counts that add up over chunks (the others describe every chunk alike).
_SUMMED = ("spin_updates", "solves")


def _merge(job: Job):
    """Concatenate the chunks in order; numeric info is averaged weighted by reads."""
    offsets = sorted(job.chunks)
    samples = torch.cat([job.chunks[o][0] for o in offsets])
    infos = [job.chunks[o][1] for o in offsets]
    weights = [job.chunks[o][0].shape[0] for o in offsets]
    info = dict(infos[0])
    for key, value in infos[0].items():
        if isinstance(value, float) and all(isinstance(i.get(key), float) for i in infos):
            info[key] = sum(w * i[key] for w, i in zip(weights, infos, strict=True)) / sum(weights)
    for key in _SUMMED:
        if all(isinstance(i.get(key), int) for i in infos):
            info[key] = sum(i[key] for i in infos)
    # Wall time from the first chunk's start to now: chunks run on several workers at once,
    # so the sum of their times can exceed it (and the client's own wall time).
    info["seconds"] = time.monotonic() - (job.started or job.created)
    info["worker_seconds"] = sum(float(i.get("seconds", 0.0)) for i in infos)
    info["chunks"] = len(infos)
    info["queue_seconds"] = (job.started or job.created) - job.created
    return samples, info
