"""Any dimod sampler (D-Wave's Ocean interface) as a Boltzmann-machine backend."""

from __future__ import annotations

import importlib
from typing import Any

import numpy as np
import torch

from ._base import BoltzmannSampler, SamplerError
from ._errors import SamplerNotInstalled

_INSTALL_HINT = "pip install 'scqbm[dimod]'"

#: Short names of the samplers of ``dwave-samplers`` (classes looked up at call time).
NAMED_DIMOD_SAMPLERS = {
    # Classical simulated annealing (Metropolis sweeps over a schedule of beta).
    "simulated_annealing": "SimulatedAnnealingSampler",
    # Simulated quantum annealing: path-integral Monte Carlo of a transverse-field Ising model.
    "path_integral": "PathIntegralAnnealingSampler",
    # Exact Boltzmann samples at inverse temperature `beta` by variable elimination; limited
    # to problems of treewidth <= 25 (a dense machine of n units has treewidth n - 1).
    "tree_decomposition": "TreeDecompositionSampler",
}


def import_dimod():
    """Import ``dimod``, or raise an ``ImportError`` with the install hint."""
    try:
        return importlib.import_module("dimod")
    except ImportError as err:
        raise SamplerNotInstalled(
            f"The 'dimod' sampler backend needs dimod and dwave-samplers: {_INSTALL_HINT}"
        ) from err


def _resolve(sampler: str | Any):
    """A dimod sampler instance from a short name, a ``"module:Class"`` path or an instance."""
    if not isinstance(sampler, str):
        return sampler
    if sampler in NAMED_DIMOD_SAMPLERS:
        module_name, class_name = "dwave.samplers", NAMED_DIMOD_SAMPLERS[sampler]
    else:
        module_name, _, class_name = sampler.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise SamplerNotInstalled(
            f"The dimod sampler {sampler!r} needs the module {module_name!r}: {_INSTALL_HINT}"
        ) from err
    try:
        return getattr(module, class_name)()
    except AttributeError:
        raise ValueError(
            f"{module_name!r} has no sampler {class_name!r} (installed version too old?)."
        ) from None


def to_bqm(h: torch.Tensor, W: torch.Tensor):
    """The binary quadratic model (``BINARY`` vartype) with the energy ``-h.z - z'Wz``.

    ``z'Wz = 2 sum_{i<j} W_ij z_i z_j`` with ``W`` symmetric and zero-diagonal, so the linear
    biases are ``-h_i`` and the quadratic biases ``-2 W_ij`` for ``i < j``; variables are
    labelled ``0 .. n-1``. Zero couplings are left out, keeping an RBM sparse.
    """
    dimod = import_dimod()
    h_np = h.detach().cpu().double().numpy()
    W_np = W.detach().cpu().double().numpy()
    rows, cols = np.triu_indices(h_np.shape[0], k=1)
    values = W_np[rows, cols]
    keep = values != 0.0
    return dimod.BinaryQuadraticModel.from_numpy_vectors(
        -h_np, (rows[keep], cols[keep], -2.0 * values[keep]), 0.0, dimod.BINARY
    )


class DimodSampler(BoltzmannSampler):
    """Sample with any dimod sampler: simulated or quantum annealers, exact solvers.

    The problem is converted exactly to a ``BINARY`` binary quadratic model (see
    :func:`to_bqm`), the sampler is called with ``num_reads`` and the keyword arguments given
    here, and the samples are returned in the original variable order.

    Parameters
    ----------
    n_units
        Number of binary units.
    sampler
        One of :data:`NAMED_DIMOD_SAMPLERS` (``"simulated_annealing"``, ``"path_integral"``,
        ``"tree_decomposition"``), an importable ``"module:Class"`` path of a dimod sampler, or
        a sampler instance. Names keep the model's ``sampler_kwargs`` picklable; an instance
        does not survive saving the model.
    num_reads
        Reads per training step (``properties["num_reads"]``); ``None`` leaves the number to
        the caller (the model then uses its ``num_negative_samples``).
    seed
        Seed of the per-call seeds passed to samplers that accept one (successive calls get
        different seeds, so training steps do not reuse random numbers).
    **sample_kwargs
        Passed to ``sampler.sample`` on every call, e.g. ``num_sweeps``, ``beta_range``,
        ``beta_schedule_type`` for simulated annealing, ``beta`` for tree decomposition. They
        are checked against ``sampler.parameters`` on first use.

    Notes
    -----
    Annealers are optimisers: ``dwave-samplers``' simulated annealing by default picks a
    ``beta_range`` from the problem's coefficients that ends far colder than ``beta = 1``, so
    its samples concentrate on low-energy states, and because that range scales with the
    problem, rescaling ``h`` and ``W`` does not change the distribution. For Boltzmann samples
    give a fixed ``beta_range`` and wrap the backend in
    :class:`~scqbm.samplers.CalibratedSampler`.
    ``tree_decomposition`` samples the Boltzmann distribution exactly (``beta=1`` by default)
    but only for problems of small treewidth (an RBM's treewidth is its smaller side).

    """

    name = "dimod"

    def __init__(
        self,
        n_units: int,
        sampler: str | Any = "simulated_annealing",
        num_reads: int | None = None,
        seed: int | None = None,
        **sample_kwargs,
    ):
        super().__init__()
        if isinstance(sampler, str) and sampler not in NAMED_DIMOD_SAMPLERS and ":" not in sampler:
            raise ValueError(
                f"Unknown dimod sampler {sampler!r}: use one of {sorted(NAMED_DIMOD_SAMPLERS)}, "
                "a 'module:Class' path or a dimod sampler instance."
            )
        if num_reads is not None and (isinstance(num_reads, bool) or int(num_reads) < 1):
            raise ValueError(f"`num_reads` must be a positive integer or None, got {num_reads}.")
        self.n_units = n_units
        self.num_reads = None if num_reads is None else int(num_reads)
        self.sampler_spec = sampler
        self.seed = seed
        self.sample_kwargs = dict(sample_kwargs)
        # Resolved on first use: importing dimod is optional and must not happen on load.
        self._sampler = None
        self._seeds = np.random.default_rng(seed)

    def random_state(self) -> dict:
        # Each call draws the dimod sampler's seed from this stream.
        return {**super().random_state(), "seeds": self._seeds.bit_generator.state}

    def set_random_state(self, state: dict) -> None:
        super().set_random_state(state)
        if "seeds" in state:
            self._seeds.bit_generator.state = state["seeds"]

    @property
    def properties(self) -> dict:
        # Annealers start every read afresh: there are no chains to keep.
        return {"persistent": False, "num_reads": self.num_reads}

    @property
    def sweeps_per_read(self) -> int:
        # The `num_sweeps` passed to the dimod sampler; 1 when left to the sampler's default.
        return max(1, int(self.sample_kwargs.get("num_sweeps", 1)))

    def preflight(self) -> None:
        """Check that dimod and the configured sampler import (the sampler is not called)."""
        self.dimod_sampler  # noqa: B018 - resolves, imports and checks the keywords

    @property
    def dimod_sampler(self):
        """The wrapped dimod sampler (imported and checked on first access)."""
        if self._sampler is None:
            import_dimod()
            sampler = _resolve(self.sampler_spec)
            accepted = set(getattr(sampler, "parameters", {}) or {})
            unknown = set(self.sample_kwargs) - accepted
            if accepted and unknown:
                raise TypeError(
                    f"{type(sampler).__name__}.sample does not accept {sorted(unknown)}; it "
                    f"accepts {sorted(accepted)}."
                )
            self._sampler = sampler
        return self._sampler

    def _sample(self, h, W, num_reads, n_visible):
        sampler = self.dimod_sampler
        kwargs = dict(self.sample_kwargs)
        if self.seed is not None and "seed" in (getattr(sampler, "parameters", {}) or {}):
            kwargs.setdefault("seed", int(self._seeds.integers(2**31 - 1)))
        n = h.shape[0]
        result = sampler.sample(to_bqm(h, W), num_reads=num_reads, **kwargs)
        record = result.record
        # Aggregated sample sets count repeated samples in num_occurrences.
        samples = np.repeat(record.sample, record.num_occurrences, axis=0)
        order = np.asarray([result.variables.index(i) for i in range(n)])
        if samples.shape[0] < num_reads:
            raise SamplerError(
                f"dimod sampler {type(sampler).__name__} returned {samples.shape[0]} samples, "
                f"{num_reads} were asked for."
            )
        samples = torch.as_tensor(samples[:num_reads, order], dtype=h.dtype, device=h.device)
        info: dict = {"backend": type(sampler).__name__}
        if "num_sweeps" in kwargs:
            info["spin_updates"] = int(kwargs["num_sweeps"]) * num_reads * n
        if "beta_range" in result.info:
            info["beta_range"] = [float(b) for b in result.info["beta_range"]]
        return samples, info

    def __getstate__(self):
        # Sampler instances may hold native handles; names are re-resolved after unpickling.
        state = self.__dict__.copy()
        if isinstance(self.sampler_spec, str):
            state["_sampler"] = None
        return state

    def extra_repr(self) -> str:
        spec = self.sampler_spec
        if not isinstance(spec, str):
            spec = type(spec).__name__
        kwargs = "".join(f", {k}={v!r}" for k, v in self.sample_kwargs.items())
        return f"n_units={self.n_units}, sampler={spec!r}{kwargs}"
