"""The sampler interface shared by every backend (shaped after dimod's ``Sampler``).

A sampler receives a Boltzmann machine as fields ``h`` and couplings ``W`` (``E(z) = -h.z -
z'Wz``, ``W`` symmetric with zero diagonal, ``z`` in {0, 1}^n) and a number of reads, and
returns a :class:`SampleSet`: the binary samples, their energies and timing information.
Samplers are ``nn.Module``s so that state they keep between calls (persistent chains) is a
buffer: saved with the model, restored on load and moved with it between devices.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch
from torch import nn

from scqbm.prior import boltzmann_energy


class SamplerError(RuntimeError):
    """A sampler failed; the message names the sampler and, during training, the step."""


@dataclass
class SampleSet:
    """Binary samples with their energies, like dimod's ``SampleSet``.

    Attributes
    ----------
    samples
        ``(num_reads, n)`` tensor of 0/1 values.
    energies
        ``(num_reads,)`` energies ``E(z)`` under the problem that was sampled.
    info
        Backend details: ``seconds`` (wall time), ``sampler`` (name), and anything specific.

    """

    samples: torch.Tensor
    energies: torch.Tensor
    info: dict = field(default_factory=dict)

    @property
    def num_reads(self) -> int:
        return self.samples.shape[0]


def validate_problem(h: torch.Tensor, W: torch.Tensor, n_units: int | None = None) -> None:
    """Check shapes, symmetry, the zero diagonal and finiteness; raise a clear ``ValueError``."""
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


def check_chain_settings(sampler: str, num_chains: int, num_sweeps: int, burn_in: int) -> None:
    """Raise a clear ``ValueError`` for chain settings no Markov-chain sampler can use."""
    if num_chains < 1 or num_sweeps < 1 or burn_in < 0:
        raise ValueError(
            f"{sampler} needs num_chains >= 1, num_sweeps >= 1 and burn_in >= 0; got "
            f"{num_chains}, {num_sweeps}, {burn_in}."
        )


class BoltzmannSampler(nn.Module, ABC):
    """Base class of samplers of Boltzmann distributions over binary vectors.

    Subclasses implement :meth:`_sample`; :meth:`sample` validates the problem, times the call
    and fills in the energies.
    """

    #: Name under which the backend is registered (``QBMVAE(sampler=name)``).
    name: str = ""

    def sample(
        self,
        h: torch.Tensor,
        W: torch.Tensor,
        num_reads: int,
        *,
        n_visible: int | None = None,
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

        """
        h, W = h.detach(), W.detach()
        validate_problem(h, W)
        if num_reads < 1:
            raise ValueError(f"`num_reads` must be a positive integer, got {num_reads}.")
        start = time.perf_counter()
        samples, info = self._sample(h, W, int(num_reads), n_visible)
        seconds = time.perf_counter() - start
        samples = samples.to(device=h.device, dtype=h.dtype)
        return SampleSet(
            samples,
            boltzmann_energy(samples, h, W),
            {"sampler": self.name, "seconds": seconds, **info},
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
