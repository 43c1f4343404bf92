"""Child processes that run the sampling pool's chunks off the service's own interpreter.

With worker *threads*, big requests and small ones share one interpreter: the kernels release
the GIL, but the Python around every sweep (validation, tensor bookkeeping, the event loop)
does not, so a small request behind a big one took about 6 small requests' time end to end
(``benchmarks/results/service.log``). Here every pool worker hands its chunk to a child
process instead and waits for it (blocking, so the service's interpreter stays free): the
express lane and the event loop then only compete for CPU cores, not for the GIL.

Children are started with ``spawn`` (the service runs threads; ``fork`` would copy locks held
by them), build backends from a picklable :class:`BackendSpec` (registered built-in names
only: a backend registered at run time in the parent does not exist in a fresh interpreter)
and keep one instance per problem size, as the thread workers do. A child that dies (killed,
out of memory) fails the chunks it held with :class:`~scqbm.samplers.SamplerUnavailable` and
the lane is rebuilt for the next chunk.
"""

from __future__ import annotations

import concurrent.futures
import logging
import multiprocessing
import os
import signal
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch

from .._errors import SamplerUnavailable

logger = logging.getLogger(__name__)

#: How often a child checks that the service that started it is still there.
PARENT_POLL_SECONDS = 1.0
#: Seconds a child may take to start (import torch and scqbm) before the lane gives up.
START_TIMEOUT = 120.0


@dataclass(frozen=True)
class BackendSpec:
    """What a child process needs to build the service's backend: picklable and hashable."""

    name: str
    kwargs: tuple = field(default=())  # sorted (key, value) pairs
    device: str = "cpu"

    @classmethod
    def of(cls, name: str, kwargs: dict[str, Any], device: str) -> BackendSpec:
        return cls(name, tuple(sorted(kwargs.items())), str(device))

    def build(self, n_units: int) -> torch.nn.Module:
        from .._registry import make_sampler

        return make_sampler(self.name, n_units, **dict(self.kwargs)).to(self.device)


def spawnable(name: str) -> bool:
    """Whether a fresh interpreter knows the backend ``name`` (a built-in registration)."""
    from .._registry import _SAMPLERS

    factory = _SAMPLERS.get(name)
    return factory is not None and getattr(factory, "__module__", "").startswith("scqbm.")


# ----------------------------------------------------------------------- in the child
_BACKENDS: OrderedDict = OrderedDict()


def _child_init() -> None:
    # One thread per child: the lane's parallelism is its processes. Ctrl-C is the parent's.
    torch.set_num_threads(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # A parent killed without closing the lane (SIGKILL, a crash) must not leave its
    # children waiting on the call queue forever: they exit when it is gone.
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_POLL_SECONDS)
        os._exit(0)

    threading.Thread(target=watch, daemon=True, name="scqbm-parent-watch").start()


def _child_ready(spec: BackendSpec) -> int:
    spec.build(2)  # imports the backend and checks that it builds here
    time.sleep(0.2)  # hold this child so that the next warm-up call lands on another
    return multiprocessing.current_process().pid


def _child_sample(spec: BackendSpec, h, W, reads: int, n_visible, max_cached: int):
    key = (spec, h.shape[0])
    sampler = _BACKENDS.pop(key, None)
    if sampler is None:
        sampler = spec.build(h.shape[0])
    _BACKENDS[key] = sampler
    while len(_BACKENDS) > max_cached:
        _BACKENDS.popitem(last=False)
    with torch.no_grad():
        result = sampler.sample(h, W, reads, n_visible=n_visible)
    # 0/1 values: one byte each on the way back instead of four or eight.
    return result.samples.to(torch.uint8).cpu(), dict(result.info)


# ---------------------------------------------------------------------- in the parent
class ProcessLane:
    """``processes`` children that run chunks for the pool's worker threads.

    Parameters
    ----------
    spec
        The backend the children build.
    processes
        Number of child processes (the pool's ``workers``).
    max_cached
        Backend instances a child keeps (one per problem size).

    """

    def __init__(
        self, spec: BackendSpec, processes: int, max_cached: int = 4, required: bool = True
    ):
        self.spec, self.processes, self.max_cached = spec, processes, max_cached
        self.required = required
        self._executor: concurrent.futures.ProcessPoolExecutor | None = None
        self._lock = threading.Lock()
        self._closed = False
        self._failed: str | None = None  # why the children could not start (not required)

    @property
    def usable(self) -> bool:
        """False once an optional lane (not ``required``) failed to start."""
        return self._failed is None

    def available(self) -> bool:
        """Whether chunks go to the children: started now if needed.

        Children that cannot start raise when the lane is ``required``; otherwise (the
        service's ``worker_kind="auto"``) the lane turns itself off with one warning and the
        workers sample in threads.
        """
        if self._failed is not None:
            return False
        try:
            self._ensure()
        except Exception as err:
            hint = (
                f"The service's worker processes could not start ({type(err).__name__}: "
                f"{err}). A script that starts the service must guard its code with "
                "`if __name__ == '__main__':`, since worker processes are spawned and "
                "import the main module."
            )
            if self.required or self._closed:
                raise SamplerUnavailable(hint) from err
            self._failed = hint
            logger.warning("%s Sampling in threads instead.", hint)
            return False
        return True

    def _ensure(self) -> concurrent.futures.ProcessPoolExecutor:
        with self._lock:
            if self._closed:
                raise SamplerUnavailable("the sampling service is shutting down")
            if self._executor is None:
                executor = concurrent.futures.ProcessPoolExecutor(
                    max_workers=self.processes,
                    mp_context=multiprocessing.get_context("spawn"),
                    initializer=_child_init,
                )
                try:
                    warm = [
                        executor.submit(_child_ready, self.spec) for _ in range(self.processes)
                    ]
                    for future in warm:
                        future.result(timeout=START_TIMEOUT)
                except BaseException:
                    executor.shutdown(wait=False, cancel_futures=True)
                    raise
                self._executor = executor
            return self._executor

    def run(self, h, W, reads: int, n_visible) -> tuple[torch.Tensor, dict]:
        """Sample one chunk in a child; blocks the calling worker thread until it is done."""
        executor = self._ensure()
        try:
            future = executor.submit(
                _child_sample, self.spec, h, W, reads, n_visible, self.max_cached
            )
            samples, info = future.result()
        except concurrent.futures.process.BrokenProcessPool as err:
            with self._lock:
                if self._executor is executor:  # the next chunk starts a new lane
                    self._executor = None
            executor.shutdown(wait=False, cancel_futures=True)
            raise SamplerUnavailable(
                f"a sampling process of the service died ({err}); the service restarts them"
            ) from err
        return samples.to(h.dtype), info

    def close(self) -> None:
        """Stop the children (chunks still running are abandoned)."""
        with self._lock:
            self._closed = True
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)
