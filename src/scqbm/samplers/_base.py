"""The sampler interface shared by every backend (shaped after dimod's ``Sampler``).

A sampler receives a Boltzmann machine as fields ``h`` and couplings ``W`` (``E(z) = -h.z -
z'Wz``, ``W`` symmetric with zero diagonal, ``z`` in {0, 1}^n) and a number of reads, and
returns a :class:`SampleSet`: the binary samples, their energies and timing information.
Samplers are ``nn.Module``s so that state they keep between calls (persistent chains) is a
buffer: saved with the model, restored on load and moved with it between devices.

Like dimod's ``Sampler``, every backend declares what it does instead of letting callers
guess: :attr:`BoltzmannSampler.parameters` (the keyword arguments :meth:`~BoltzmannSampler.
sample` accepts) and :attr:`BoltzmannSampler.properties` (``"persistent"``: whether it keeps
chains between calls; ``"num_reads"``: the number of negative samples per training step it
is built for, or ``None`` when the caller chooses). Two more declarations serve callers that
budget or check a backend before using it, such as the sampling service:
:attr:`BoltzmannSampler.sweeps_per_read` (what one fresh read costs) and
:meth:`BoltzmannSampler.preflight` (a cheap check that the backend can run here, without
sampling). Persistent chains live in one helper, :class:`PersistentChainSampler`, shared by
every chain-based backend.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod

import torch
from torch import nn

from scqbm.prior import boltzmann_energy

from ._errors import SamplerError, SamplerUnavailable

__all__ = [
    "DEFAULT_NUM_READS",
    "BoltzmannSampler",
    "PersistentChainSampler",
    "SampleSet",
    "SamplerError",
    "SamplerUnavailable",
    "check_chain_settings",
    "reject_unknown",
    "validate_problem",
]


#: Negative samples per training step when a sampler leaves the number to the caller.
DEFAULT_NUM_READS = 512


class SampleSet:
    """Binary samples with their energies, like dimod's ``SampleSet``.

    Attributes
    ----------
    samples
        ``(num_reads, n)`` tensor of 0/1 values.
    energies
        ``(num_reads,)`` energies ``E(z)`` under the problem that was sampled. Computed on
        first access when the sampler passed the problem instead: training reads only the
        samples, and at 1,024 units the energies of 512 reads cost as much as a Gibbs sweep.
    info
        Backend details: ``seconds`` (wall time), ``sampler`` (name), and anything specific.

    """

    def __init__(
        self,
        samples: torch.Tensor,
        energies: torch.Tensor | None = None,
        info: dict | None = None,
        *,
        problem: tuple[torch.Tensor, torch.Tensor] | None = None,
    ):
        if energies is None and problem is None:
            raise ValueError("A SampleSet needs its energies or the problem (h, W) behind them.")
        self.samples = samples
        self._energies = energies
        self._problem = problem
        self.info = {} if info is None else info

    @property
    def energies(self) -> torch.Tensor:
        if self._energies is None:
            h, W = self._problem
            self._energies = boltzmann_energy(self.samples, h, W)
            self._problem = None
        return self._energies

    @property
    def num_reads(self) -> int:
        return self.samples.shape[0]

    def __repr__(self) -> str:
        n = self.samples.shape[-1]
        return f"SampleSet(num_reads={self.num_reads}, n={n}, info={self.info})"


def validate_problem(
    h: torch.Tensor,
    W: torch.Tensor,
    n_units: int | None = None,
    n_visible: int | None = None,
) -> None:
    """Check a Boltzmann problem; raise a clear ``ValueError``.

    Shapes, symmetry, the zero diagonal, finiteness and, with ``n_visible``, that ``W``
    couples only the two sides of a bipartite (RBM) problem.
    """
    if h.dim() != 1 or W.shape != (h.shape[0], h.shape[0]):
        raise ValueError(
            f"Expected h of shape (n,) and W of shape (n, n); got {tuple(h.shape)} and "
            f"{tuple(W.shape)}."
        )
    if n_units is not None and h.shape[0] != n_units:
        raise ValueError(
            f"This sampler was built for {n_units} units, got a problem with {h.shape[0]}."
        )
    if not (torch.isfinite(h).all() and torch.isfinite(W).all()):
        raise ValueError("The Boltzmann problem has NaN or infinite fields or couplings.")
    tol = 1e-5 * (1.0 + W.abs().max().item())
    if (W - W.T).abs().max().item() > tol:
        raise ValueError("W must be symmetric (E(z) = -h.z - z'Wz uses both W_ij and W_ji).")
    if W.diagonal().abs().max().item() > tol:
        raise ValueError("W must have a zero diagonal (z_i^2 = z_i would double-count fields).")
    if n_visible is not None:
        n = h.shape[0]
        if isinstance(n_visible, bool) or not isinstance(n_visible, int):
            raise ValueError(f"n_visible must be an integer or None, got {n_visible!r}.")
        if not 0 < n_visible < n:
            raise ValueError(f"n_visible must be between 1 and {n - 1}, got {n_visible}.")
        within = max(
            W[:n_visible, :n_visible].abs().max().item(),
            W[n_visible:, n_visible:].abs().max().item(),
        )
        if within > 0:
            raise ValueError(
                "n_visible is given but W couples units within a side: not a bipartite (RBM) "
                "problem. Omit n_visible for a dense problem."
            )


def check_chain_settings(sampler: str, num_chains: int, num_sweeps: int, burn_in: int) -> None:
    """Raise a clear ``ValueError`` for chain settings no Markov-chain sampler can use."""
    if num_chains < 1 or num_sweeps < 1 or burn_in < 0:
        raise ValueError(
            f"{sampler} needs num_chains >= 1, num_sweeps >= 1 and burn_in >= 0; got "
            f"{num_chains}, {num_sweeps}, {burn_in}."
        )


def reject_unknown(what: str, given, accepted) -> None:
    """Raise a ``TypeError`` naming unknown keyword arguments and the accepted ones."""
    unknown = sorted(set(given) - set(accepted))
    if unknown:
        raise TypeError(f"{what} does not accept {unknown}; accepted: {sorted(accepted)}.")


class BoltzmannSampler(nn.Module, ABC):
    """Base class of samplers of Boltzmann distributions over binary vectors.

    Subclasses implement :meth:`_sample`; :meth:`sample` validates the problem and the keyword
    arguments, times the call and fills in the energies. They declare :attr:`parameters` and
    :attr:`properties`.
    """

    #: Name under which the backend is registered (``QBMVAE(sampler=name)``).
    name: str = ""

    @property
    def parameters(self) -> dict[str, list]:
        """Keyword arguments accepted by ``sample`` (name -> related properties).

        As in dimod (see :meth:`~scqbm.samplers.BoltzmannSampler.sample`); anything else is
        rejected with a ``TypeError``.
        """
        return {"num_reads": [], "n_visible": []}

    @property
    def properties(self) -> dict:
        """What the sampler does, as in dimod.

        ``persistent``: whether it keeps chains across calls; ``num_reads``: the negative
        samples per training step it is built for (``None``: the caller chooses).
        """
        return {"persistent": False, "num_reads": None}

    @property
    def sweeps_per_read(self) -> int:
        """Sweeps over all units that one read of a fresh call costs (at least 1).

        Used for compute budgets (the sampling service's ``max_work`` is units x reads x this
        number). Chain samplers declare ``burn_in + num_sweeps`` times their replicas; a
        backend that cannot say (an external annealer, a remote service) declares 1.
        """
        return 1

    def preflight(self) -> None:
        """Check, without sampling, that the backend can run here; raise otherwise.

        Called by the sampling service at startup so that a misconfigured host fails at once
        instead of on the first request. The default does nothing; backends that need an
        optional package, a licence or credentials override it and raise
        :class:`SamplerUnavailable` (or :class:`SamplerNotInstalled`) with the reason.
        Wrappers check their child.
        """

    def random_state(self) -> dict:
        """Host-side random state, for :meth:`~scqbm.samplers.BoltzmannSampler.set_random_state`.

        Persistent chains are buffers and travel with the ``state_dict``; what a seeded
        sampler keeps outside it (its own generator, a seed stream, a call counter) is
        returned here, so that a failed ``train()`` can put a seeded run back exactly where
        it was. Samplers without a seed return the state of no generator: they draw from
        torch's global one, which belongs to the user.
        """
        generator = getattr(self, "_generator", None)
        return {
            "generator": generator,
            "generator_state": None if generator is None else generator.get_state(),
        }

    def set_random_state(self, state: dict) -> None:
        """Restore what :meth:`~scqbm.samplers.BoltzmannSampler.random_state` returned."""
        generator = state.get("generator")
        if generator is not None:
            generator.set_state(state["generator_state"])
        if "generator" in state:
            self._generator = generator

    def sample(
        self,
        h: torch.Tensor,
        W: torch.Tensor,
        num_reads: int,
        *,
        n_visible: int | None = None,
        check: bool = True,
        **kwargs,
    ) -> SampleSet:
        """Draw ``num_reads`` samples of ``p(z) ∝ exp(h.z + z'Wz)``.

        Parameters
        ----------
        h, W
            Fields ``(n,)`` and symmetric zero-diagonal couplings ``(n, n)``.
        num_reads
            Number of samples to return.
        n_visible
            For a bipartite (RBM) problem, the size of the first side; lets backends use block
            updates. ``None`` for a dense problem.
        check
            Validate the problem (:func:`validate_problem`: shapes, finiteness, symmetry, zero
            diagonal, bipartite structure). Only callers that build the problem valid by
            construction (the prior in the training loop, a wrapper passing on a validated
            problem) skip it: it reads several values back from the device per call.
        **kwargs
            Backend-specific per-call arguments named in :attr:`parameters`; others are
            rejected with a ``TypeError``.

        """
        reject_unknown(
            f"{type(self).__name__}.sample", [*kwargs, "num_reads", "n_visible"], self.parameters
        )
        h, W = h.detach(), W.detach()
        if check:
            validate_problem(h, W, n_visible=n_visible)
        if isinstance(num_reads, bool) or int(num_reads) != num_reads or num_reads < 1:
            raise ValueError(f"`num_reads` must be a positive integer, got {num_reads}.")
        start = time.perf_counter()
        samples, info = self._sample(h, W, int(num_reads), n_visible, **kwargs)
        seconds = time.perf_counter() - start
        samples = samples.to(device=h.device, dtype=h.dtype)
        return SampleSet(
            samples, info={"sampler": self.name, "seconds": seconds, **info}, problem=(h, W)
        )

    def _rng(self, device: torch.device) -> torch.Generator | None:
        """The sampler's own generator on ``device`` (seeded from ``self.seed``), or ``None``.

        One generator per sampler keeps a seeded sampler reproducible without touching the
        global torch RNG; it is recreated when the model moves to another device.
        """
        seed = getattr(self, "seed", None)
        if seed is None:
            return None
        generator = getattr(self, "_generator", None)
        if generator is None or generator.device != device:
            generator = torch.Generator(device=device).manual_seed(seed)
            self._generator = generator
        return generator

    @abstractmethod
    def _sample(
        self, h: torch.Tensor, W: torch.Tensor, num_reads: int, n_visible: int | None
    ) -> tuple[torch.Tensor, dict]:
        """Return ``(samples, info)``."""


class PersistentChainSampler(BoltzmannSampler):
    """Base of samplers with persistent chains (PCD, Tieleman 2008).

    The one owner of chain state for every chain backend.

    The chains live in the buffer ``state`` of shape ``(*chain_shape, num_chains, n_units)``
    with the flag ``initialized``. A call for ``num_chains`` reads of a problem of
    ``n_units`` units continues them by ``num_sweeps`` sweeps (plus ``burn_in`` on first use);
    any other call runs fresh chains for ``burn_in + num_sweeps`` sweeps and leaves the
    persistent ones untouched (``info["persistent"]`` says which happened).

    Subclasses implement ``_advance`` (run the chains) and call ``_init_chains`` in
    their constructor.
    """

    def _init_chains(
        self,
        n_units: int,
        num_chains: int,
        num_sweeps: int,
        burn_in: int,
        seed: int | None,
        persistent: bool,
        chain_shape: tuple[int, ...] = (),
    ) -> None:
        check_chain_settings(type(self).__name__, num_chains, num_sweeps, burn_in)
        self.n_units = n_units
        self.num_chains = num_chains
        self.num_sweeps = num_sweeps
        self.burn_in = burn_in
        self.seed = seed
        self.persistent = bool(persistent)
        self._chain_shape = tuple(chain_shape)
        self.register_buffer("state", torch.zeros(*chain_shape, num_chains, n_units))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        # Host copy of `initialized`, so that a training step reads nothing back from the
        # device; `None` after loading a state (read the buffer once).
        self._initialized_on_host: bool | None = False
        self._generator: torch.Generator | None = None

    @property
    def properties(self) -> dict:
        return {"persistent": self.persistent, "num_reads": self.num_chains}

    @property
    def sweeps_per_read(self) -> int:
        # A fresh chain runs burn-in and sweeps, once per replica (e.g. per temperature).
        replicas = 1
        for size in self._chain_shape:
            replicas *= size
        return max(1, self.burn_in + self.num_sweeps) * replicas

    @abstractmethod
    def _advance(
        self, z: torch.Tensor, h, W, n_visible, sweeps: int, generator, persistent: bool
    ) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """Run chains ``z`` for ``sweeps``; return ``(new chain state, samples, info)``."""

    def _sample(self, h, W, num_reads, n_visible):
        generator = self._rng(h.device)
        n = h.shape[0]
        persistent = self.persistent and num_reads == self.num_chains and n == self.n_units
        if persistent:
            z = self.state.to(h.dtype)
            sweeps = self.num_sweeps
            if not self._chains_initialized():
                z = torch.rand(z.shape, generator=generator, device=h.device, dtype=h.dtype)
                z, sweeps = z.round(), sweeps + self.burn_in
        else:
            shape = (*self._chain_shape, num_reads, n)
            z = torch.rand(shape, generator=generator, device=h.device, dtype=h.dtype).round()
            sweeps = self.burn_in + self.num_sweeps
        z, samples, info = self._advance(z, h, W, n_visible, sweeps, generator, persistent)
        if persistent:
            # In place: rebinding a buffer inside inference mode breaks later backward passes.
            self.state.copy_(z)
            self.initialized.fill_(True)
            self._initialized_on_host = True
        return samples.clone(), {"persistent": persistent, "sweeps": sweeps, **info}

    def reset(self) -> None:
        """Forget the persistent chains (they are re-initialised and burnt in on next use)."""
        self.initialized.fill_(False)
        self._initialized_on_host = False

    def _chains_initialized(self) -> bool:
        if self._initialized_on_host is None:
            self._initialized_on_host = bool(self.initialized)
        return self._initialized_on_host

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._initialized_on_host = None  # the loaded chains may or may not be burnt in
