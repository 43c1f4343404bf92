"""QBoson's kaiwu SDK as backends: simulated annealing (``kaiwu_sa``) and the CIM (``kaiwu_cim``).

Both send the prior as an Ising matrix with an auxiliary spin for the fields (see
:mod:`scqbm.samplers._ising`), map the returned spins back to binary states with gauge
fixing, and check the problem against the machine (spin capacity, coupling bit width) before
any call to the SDK. Credentials come from the arguments or the environment variables
``SCQBM_KAIWU_USER_ID`` and ``SCQBM_KAIWU_SDK_CODE``; without them the backends raise at once
instead of letting kaiwu prompt on standard input.

kaiwu has a wheel for CPython 3.10 only. From another Python, serve a kaiwu backend with
``scqbm serve-sampler`` in a 3.10 environment and use the ``remote`` sampler.

What could not be run where this was written: licensed kaiwu calls (its licence server is not
reachable there) and QBoson's CIM cloud. The conversion, precision and capacity code paths
are tested up to the SDK call with a stand-in SDK.
"""

from __future__ import annotations

import tempfile
import uuid
from abc import abstractmethod

import numpy as np
import torch

from ._base import BoltzmannSampler, SamplerError
from ._ising import (
    CIM_BIT_WIDTH,
    CIM_MAX_SPINS,
    IsingProblem,
    boltzmann_to_ising,
    check_spin_capacity,
    reduce_precision,
    spins_to_binary,
)
from ._kaiwu_sdk import import_kaiwu, init_license, resolve_credentials, run_optimizer


class _KaiwuSampler(BoltzmannSampler):
    """Shared path of the kaiwu backends: conversion, checks, licence, repeated solves."""

    machine = "kaiwu"

    def __init__(
        self,
        n_units: int,
        *,
        user_id: str | None,
        sdk_code: str | None,
        bit_width: int | None,
        precision_scale: float | None,
        max_spins: int | None,
        max_solves: int,
        num_reads: int | None,
    ):
        super().__init__()
        if num_reads is not None and (isinstance(num_reads, bool) or int(num_reads) < 1):
            raise ValueError(f"`num_reads` must be a positive integer or None, got {num_reads}.")
        self.num_reads = None if num_reads is None else int(num_reads)
        if max_solves < 1:
            raise ValueError(f"`max_solves` must be at least 1, got {max_solves}.")
        self.n_units = n_units
        # Saved with the model's constructor arguments: prefer the environment variables.
        self.user_id = user_id
        self.sdk_code = sdk_code
        self.bit_width = bit_width
        self.precision_scale = precision_scale
        self.max_spins = max_spins
        self.max_solves = max_solves
        self._licensed = False
        # Solves run so far: a seeded backend seeds solve k with `seed + k`, across calls, so
        # that successive training steps do not replay the same anneals.
        self._solves = 0

    @property
    def properties(self) -> dict:
        # Every solve anneals from scratch: no chains are kept between calls.
        return {"persistent": False, "num_reads": self.num_reads}

    def prepare(self, h: torch.Tensor, W: torch.Tensor) -> tuple[np.ndarray, float, IsingProblem]:
        """The Ising matrix sent to the SDK, its precision scale and the exact Ising problem.

        Checks the spin capacity and reduces the couplings to ``bit_width`` bits (when set);
        the matrix returned is exactly what :meth:`sample` passes to the optimizer.
        """
        problem = boltzmann_to_ising(h.detach().cpu().double(), W.detach().cpu().double())
        check_spin_capacity(problem.n_spins, self.max_spins, f"kaiwu backend {self.name!r}")
        if self.bit_width is None:
            return problem.J, 1.0, problem
        matrix, scale = reduce_precision(problem.J, self.bit_width, self.precision_scale)
        return matrix, scale, problem

    def preflight(self) -> None:
        """Check, without contacting QBoson, that kaiwu imports and credentials are set.

        The sampling service calls it at startup so that a misconfigured host fails at once.
        """
        import_kaiwu()
        resolve_credentials(self.user_id, self.sdk_code)

    @abstractmethod
    def _optimizer(self, kw, remaining: int, call: int):
        """A kaiwu optimizer for solve number ``call``, asked for up to ``remaining`` solutions."""

    def random_state(self) -> dict:
        return {**super().random_state(), "solves": self._solves}

    def set_random_state(self, state: dict) -> None:
        super().set_random_state(state)
        self._solves = state.get("solves", self._solves)

    def _sample(self, h, W, num_reads, n_visible):
        kw = import_kaiwu()
        matrix, scale, problem = self.prepare(h, W)
        user_id, sdk_code = resolve_credentials(self.user_id, self.sdk_code)
        if not self._licensed:
            # Once per sampler: init downloads a licence file from QBoson's server.
            init_license(kw, user_id, sdk_code)
            self._licensed = True
        batches, total, solves = [], 0, 0
        while total < num_reads:
            if solves == self.max_solves:
                raise SamplerError(
                    f"kaiwu backend {self.name!r} returned {total} of {num_reads} reads in "
                    f"{solves} solves (max_solves); its solution pool keeps distinct states "
                    "only, so a problem with few low-energy states needs more solves."
                )
            optimizer = self._optimizer(kw, num_reads - total, self._solves)
            self._solves += 1
            solutions = run_optimizer(optimizer, matrix)
            batches.append(solutions)
            total += solutions.shape[0]
            solves += 1
        spins = np.concatenate(batches)[:num_reads]
        samples = torch.as_tensor(spins_to_binary(spins), dtype=h.dtype, device=h.device)
        info = {
            "backend": self.name,
            "solves": solves,
            "ising_spins": problem.n_spins,
            "precision_scale": scale,
        }
        return samples, info

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_licensed"] = False  # a licence belongs to a process, not to a saved model
        return state


class KaiwuSASampler(_KaiwuSampler):
    """kaiwu's classical simulated annealing (``kw.classical.SimulatedAnnealingOptimizer``).

    Needs a kaiwu licence like every kaiwu optimizer. kaiwu's annealer is an optimiser: by
    default it cools from temperature 100 to 0.001 and returns the ``size_limit`` best
    *distinct* states it met, so its reads are neither at the model's temperature nor
    repeated with Boltzmann frequencies. Raise ``cutoff_temperature`` towards 1 and wrap the
    backend in :class:`~scqbm.samplers.CalibratedSampler` to use it for the negative phase,
    and check it with :func:`~scqbm.samplers.compare`.

    Parameters
    ----------
    n_units
        Number of binary units.
    initial_temperature, alpha, cutoff_temperature, iterations_per_t, process_num
        kaiwu's annealing schedule (temperature multiplied by ``alpha`` down to
        ``cutoff_temperature``, ``iterations_per_t`` sweeps at each) and parallel processes.
    reads_per_solve
        Solutions asked of one anneal (kaiwu's ``size_limit``); anneals repeat until
        ``num_reads`` are collected.
    seed
        Seed of the first anneal (``rand_seed``; the sampler's ``k``-th solve, counted across
        calls, uses ``seed + k``).
    user_id, sdk_code
        kaiwu licence credentials; default: ``SCQBM_KAIWU_USER_ID`` and
        ``SCQBM_KAIWU_SDK_CODE``. Arguments are stored with a saved model, the environment is
        not.
    bit_width, precision_scale
        Reduce couplings to ``bit_width``-bit integers as for the CIM (``None``: full
        precision); see :func:`~scqbm.samplers.reduce_precision`.
    max_spins
        Largest Ising problem accepted (``None``: no limit).
    max_solves
        Most anneals per call.
    num_reads
        Reads per training step (``properties["num_reads"]``); ``None``: the caller chooses.

    """

    name = "kaiwu_sa"

    def __init__(
        self,
        n_units: int,
        initial_temperature: float = 100.0,
        alpha: float = 0.99,
        cutoff_temperature: float = 0.001,
        iterations_per_t: int = 10,
        reads_per_solve: int = 100,
        process_num: int = 1,
        seed: int | None = None,
        user_id: str | None = None,
        sdk_code: str | None = None,
        bit_width: int | None = None,
        precision_scale: float | None = None,
        max_spins: int | None = None,
        max_solves: int = 1000,
        num_reads: int | None = None,
    ):
        super().__init__(
            n_units,
            user_id=user_id,
            sdk_code=sdk_code,
            bit_width=bit_width,
            precision_scale=precision_scale,
            max_spins=max_spins,
            max_solves=max_solves,
            num_reads=num_reads,
        )
        if reads_per_solve < 1:
            raise ValueError(f"`reads_per_solve` must be at least 1, got {reads_per_solve}.")
        self.schedule = {
            "initial_temperature": float(initial_temperature),
            "alpha": float(alpha),
            "cutoff_temperature": float(cutoff_temperature),
            "iterations_per_t": int(iterations_per_t),
        }
        self.reads_per_solve = reads_per_solve
        self.process_num = process_num
        self.seed = seed

    def _optimizer(self, kw, remaining, call):
        return kw.classical.SimulatedAnnealingOptimizer(
            **self.schedule,
            size_limit=min(self.reads_per_solve, remaining),
            rand_seed=None if self.seed is None else self.seed + call,
            process_num=self.process_num,
        )


class KaiwuCIMSampler(_KaiwuSampler):
    """QBoson's coherent Ising machine through kaiwu's ``kw.cim.CIMOptimizer``.

    Every call submits tasks to QBoson's cloud and waits for them (kaiwu polls every
    ``interval`` minutes), so a call takes minutes: use it for evaluation and sampling
    studies, or for training with few, large negative phases. The couplings are rounded to the
    machine's 8-bit integers and the problem must fit its 550 spins (the auxiliary spin
    included).

    Parameters
    ----------
    n_units
        Number of binary units (at most ``max_spins - 1``).
    task_name
        Prefix of the task names; each task gets a unique suffix because kaiwu identifies a
        task by its name and matrix and would return the cached samples of an earlier task.
    task_mode
        ``"sampling"`` (the CIM's sampling mode, ``sample_number`` reads per task, 10 to 2000)
        or ``"optimization"``.
    interval
        Polling interval of kaiwu in minutes (at least 1).
    project_no
        QBoson project to create the tasks in (optional).
    checkpoint_dir
        kaiwu's directory for task files (``CheckpointManager.save_dir``); default: a new
        temporary directory.
    user_id, sdk_code
        kaiwu licence credentials; default: ``SCQBM_KAIWU_USER_ID`` and
        ``SCQBM_KAIWU_SDK_CODE``.
    bit_width, precision_scale
        Coupling precision of the machine and the integer units per coupling unit (``None``:
        the largest coupling maps to 127; a fixed scale lets
        :class:`~scqbm.samplers.CalibratedSampler` change the effective temperature).
    max_spins
        Spin capacity of the machine.
    max_solves
        Most tasks per call.
    num_reads
        Reads per training step (``properties["num_reads"]``); ``None``: the caller chooses.

    """

    name = "kaiwu_cim"
    #: Reads per task accepted by the CIM's sampling mode.
    SAMPLE_NUMBER_RANGE = (10, 2000)

    def __init__(
        self,
        n_units: int,
        task_name: str = "scqbm",
        task_mode: str = "sampling",
        interval: int = 1,
        project_no: str | None = None,
        checkpoint_dir: str | None = None,
        user_id: str | None = None,
        sdk_code: str | None = None,
        bit_width: int = CIM_BIT_WIDTH,
        precision_scale: float | None = None,
        max_spins: int = CIM_MAX_SPINS,
        max_solves: int = 100,
        num_reads: int | None = None,
    ):
        super().__init__(
            n_units,
            user_id=user_id,
            sdk_code=sdk_code,
            bit_width=bit_width,
            precision_scale=precision_scale,
            max_spins=max_spins,
            max_solves=max_solves,
            num_reads=num_reads,
        )
        if task_mode not in ("sampling", "optimization"):
            raise ValueError(
                f"`task_mode` must be 'sampling' or 'optimization', got {task_mode!r}."
            )
        if interval < 1:
            raise ValueError(
                f"kaiwu polls at least every minute: `interval` >= 1, got {interval}."
            )
        self.task_name = task_name
        self.task_mode = task_mode
        self.interval = interval
        self.project_no = project_no
        self.checkpoint_dir = checkpoint_dir

    def _optimizer(self, kw, remaining, call):
        if self.checkpoint_dir is None:
            self.checkpoint_dir = tempfile.mkdtemp(prefix="scqbm-kaiwu-")
        kw.common.CheckpointManager.save_dir = self.checkpoint_dir
        low, high = self.SAMPLE_NUMBER_RANGE
        return kw.cim.CIMOptimizer(
            task_name=f"{self.task_name}-{uuid.uuid4().hex[:12]}",
            wait=True,
            interval=self.interval,
            project_no=self.project_no,
            task_mode=self.task_mode,
            sample_number=min(max(remaining, low), high),
        )
