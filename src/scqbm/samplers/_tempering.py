"""Native PyTorch parallel tempering (replica exchange; Swendsen & Wang 1986, Geyer 1991)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from scqbm.prior import boltzmann_energy, gibbs_sweep

from ._base import PersistentChainSampler


def swap_log_acceptance(
    beta_a: float | torch.Tensor,
    beta_b: float | torch.Tensor,
    energy_a: torch.Tensor,
    energy_b: torch.Tensor,
) -> torch.Tensor:
    """Log Metropolis ratio of exchanging the states of replicas at ``beta_a`` and ``beta_b``.

    With ``p_k(z) ∝ exp(-beta_k E(z))`` and replica ``a`` holding a state of energy
    ``energy_a``, the exchange is accepted with probability ``min(1, exp(r))`` where

    ``r = log[p_a(z_b) p_b(z_a) / (p_a(z_a) p_b(z_b))] = (beta_a - beta_b) (energy_a - energy_b)``.

    A colder replica (``beta_a > beta_b``) holding the higher energy always gives it away.
    """
    return (beta_a - beta_b) * (energy_a - energy_b)


def swap_neighbours(
    z: torch.Tensor,
    energies: torch.Tensor,
    betas: torch.Tensor,
    parity: int,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Attempt exchanges between temperatures ``k`` and ``k + 1`` for all ``k ≡ parity (mod 2)``.

    Alternating the parity between rounds (deterministic even-odd scheme) attempts every pair
    every two rounds while keeping the attempts of one round disjoint, so they can run at once.

    Parameters
    ----------
    z
        Replica states, shape ``(n_temps, n_chains, n)``; chain ``c`` at every temperature
        forms one exchange ladder.
    energies
        ``E(z)`` of shape ``(n_temps, n_chains)``.
    betas
        Inverse temperatures ``(n_temps,)``.
    parity
        0 for pairs ``(0, 1), (2, 3), ...``; 1 for ``(1, 2), (3, 4), ...``.
    generator
        Random generator.

    Returns
    -------
    The new states and energies, and the acceptance indicator of shape
    ``(n_pairs_attempted, n_chains)`` for pairs ``k = parity, parity + 2, ...``.

    """
    low = torch.arange(parity, betas.shape[0] - 1, 2, device=z.device)
    if low.numel() == 0:
        return z, energies, torch.zeros(0, z.shape[1], device=z.device, dtype=torch.bool)
    high = low + 1
    log_ratio = swap_log_acceptance(
        betas[low].unsqueeze(-1), betas[high].unsqueeze(-1), energies[low], energies[high]
    )
    uniform = torch.rand(log_ratio.shape, generator=generator, device=z.device, dtype=z.dtype)
    accept = uniform.log() < log_ratio
    z, energies = z.clone(), energies.clone()
    z_low, z_high = z[low], z[high]
    z[low] = torch.where(accept.unsqueeze(-1), z_high, z_low)
    z[high] = torch.where(accept.unsqueeze(-1), z_low, z_high)
    e_low, e_high = energies[low], energies[high]
    energies[low] = torch.where(accept, e_high, e_low)
    energies[high] = torch.where(accept, e_low, e_high)
    return z, energies, accept


def geometric_ladder(num_temps: int, beta_min: float) -> list[float]:
    """``num_temps`` inverse temperatures from 1 down to ``beta_min``, equally spaced in log."""
    if num_temps == 1:
        return [1.0]
    ratio = math.log(beta_min) / (num_temps - 1)
    return [math.exp(k * ratio) for k in range(num_temps)]


class ParallelTemperingSampler(PersistentChainSampler):
    """Replica exchange over a ladder of inverse temperatures, returning the ``beta = 1`` replicas.

    Every round performs one Gibbs sweep of every replica at its own temperature (the shared
    kernels with per-chain scales: block updates for an RBM, systematic scans otherwise) and
    then one round of exchange moves between neighbouring temperatures. Hot replicas cross
    energy barriers that trap a single Gibbs chain, and exchanges carry their states down the
    ladder, so the target chains mix between modes. Swap acceptance rates are reported in
    ``info["swap_acceptance"]`` (one per neighbouring pair); rates near zero mean the ladder
    is too sparse (add temperatures), rates near one mean it is needlessly dense.

    Persistence follows :class:`~scqbm.samplers.GibbsSampler`: a call for ``num_chains``
    reads advances the replicas kept in the buffer ``state`` by ``num_sweeps`` rounds; any
    other number of reads runs fresh replicas for ``burn_in + num_sweeps`` rounds.

    Parameters
    ----------
    n_units
        Number of binary units (fixes the buffers' shapes, so saved models load strictly).
    num_chains
        Number of persistent exchange ladders (samples per persistent call).
    num_temps
        Number of temperatures of the default geometric ladder.
    beta_min
        Smallest inverse temperature of the default ladder, in ``(0, 1)``.
    betas
        Explicit ladder (overrides ``num_temps`` and ``beta_min``): values in ``(0, 1]``,
        containing 1; sorted in decreasing order internally.
    num_sweeps
        Rounds (sweep + exchange) per call for the persistent replicas.
    burn_in
        Rounds before the first use of the persistent replicas and for fresh replicas.
    seed
        Seed of the sampler's own random generator (``None``: torch's global generator).
    persistent
        ``False``: every call runs fresh replicas.

    Notes
    -----
    The cost of a round is ``num_temps`` times that of a Gibbs sweep. For a dense machine the
    energy variance grows with ``n``, so the ladder needs roughly ``sqrt(n)`` temperatures
    for a constant acceptance rate.

    """

    name = "parallel_tempering"

    def __init__(
        self,
        n_units: int,
        num_chains: int = 512,
        num_temps: int = 8,
        beta_min: float = 0.3,
        betas: Sequence[float] | None = None,
        num_sweeps: int = 1,
        burn_in: int = 100,
        seed: int | None = None,
        persistent: bool = True,
    ):
        super().__init__()
        if betas is None:
            if num_temps < 1 or not 0.0 < beta_min < 1.0:
                raise ValueError(
                    "The default ladder needs num_temps >= 1 and 0 < beta_min < 1; got "
                    f"num_temps={num_temps}, beta_min={beta_min}."
                )
            ladder = geometric_ladder(num_temps, beta_min)
        else:
            ladder = sorted((float(b) for b in betas), reverse=True)
            distinct = len(set(ladder)) == len(ladder)
            if not ladder or ladder[0] != 1.0 or ladder[-1] <= 0.0 or not distinct:
                raise ValueError(
                    "`betas` must be distinct inverse temperatures in (0, 1] including the "
                    f"target beta = 1; got {list(betas)}."
                )
        self.num_temps = len(ladder)
        self.register_buffer("betas", torch.tensor(ladder))
        self._init_chains(
            n_units, num_chains, num_sweeps, burn_in, seed, persistent, (self.num_temps,)
        )
        # Parity of the next exchange round, kept so a reloaded sampler continues the scheme.
        self.register_buffer("rounds", torch.zeros((), dtype=torch.long))

    def _run(self, z, h, W, n_visible, rounds, generator):
        """``rounds`` sweeps-and-exchanges of replicas ``z`` ``(n_temps, n_chains, n)``."""
        n_temps, n_chains, n = z.shape
        betas = self.betas.to(device=h.device, dtype=h.dtype)
        # One temperature per flattened chain, shape (n_temps * n_chains, 1).
        scale = betas.repeat_interleave(n_chains).unsqueeze(-1)
        accepted = torch.zeros(max(n_temps - 1, 0), device=h.device, dtype=h.dtype)
        attempts = torch.zeros_like(accepted)
        parity = int(self.rounds)
        for _ in range(rounds):
            flat = gibbs_sweep(
                z.reshape(-1, n),
                h,
                W,
                n_visible,
                field_scale=scale,
                coupling_scale=scale,
                generator=generator,
            )
            z = flat.reshape(n_temps, n_chains, n)
            z, _, accept = swap_neighbours(z, boltzmann_energy(z, h, W), betas, parity, generator)
            pairs = torch.arange(parity, n_temps - 1, 2, device=h.device)
            accepted[pairs] += accept.to(h.dtype).mean(-1)
            attempts[pairs] += 1
            parity = 1 - parity
        rates = torch.where(attempts > 0, accepted / attempts.clamp(min=1), float("nan"))
        return z, parity, rates.tolist()

    def _advance(self, z, h, W, n_visible, sweeps, generator, persistent):
        z, parity, rates = self._run(z, h, W, n_visible, sweeps, generator)
        if persistent:
            self.rounds.fill_(parity)
        info = {
            "spin_updates": sweeps * self.num_temps * z.shape[1] * z.shape[2],
            "betas": self.betas.tolist(),
            "swap_acceptance": rates,
        }
        return z, z[0], info

    def extra_repr(self) -> str:
        return (
            f"n_units={self.n_units}, num_chains={self.num_chains}, num_temps={self.num_temps}, "
            f"beta_min={self.betas[-1].item():.3g}, num_sweeps={self.num_sweeps}, "
            f"burn_in={self.burn_in}"
        )
