"""Side-by-side comparison of sampler backends: speed and distance to the target distribution."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd
import torch
from scipy.stats import wasserstein_distance

from scqbm.prior import boltzmann_energy, exact_distribution

from ._base import BoltzmannSampler
from ._tempering import ParallelTemperingSampler

#: Largest problem compared with the exact distribution over all ``2**n`` states.
EXACT_COMPARE_UNITS = 16


def _moments(samples: torch.Tensor, weights: torch.Tensor | None = None):
    """Marginals ``E[z_i]`` and pairwise moments ``E[z_i z_j]`` (``i < j``) of samples."""
    if weights is None:
        weights = torch.full((samples.shape[0],), 1.0 / samples.shape[0], dtype=samples.dtype)
    marginals = weights @ samples
    second = samples.T @ (samples * weights.unsqueeze(-1))
    rows, cols = torch.triu_indices(samples.shape[1], samples.shape[1], offset=1)
    return marginals, second[rows, cols]


def _codes(samples: torch.Tensor) -> torch.Tensor:
    """Integer code of each binary row (first unit is the most significant bit)."""
    n = samples.shape[1]
    return (samples.long() * (2 ** torch.arange(n - 1, -1, -1))).sum(-1)


def _total_variation(samples: torch.Tensor, probs: torch.Tensor) -> float:
    """TV between the empirical distribution of ``samples`` and ``probs`` over all states."""
    counts = torch.bincount(_codes(samples), minlength=probs.shape[0]).to(probs.dtype)
    return 0.5 * float((counts / samples.shape[0] - probs).abs().sum())


def _spin_updates(info: dict, num_reads: int, n: int) -> float:
    if "spin_updates" in info:
        return float(info["spin_updates"])
    if "sweeps" in info:  # Gibbs-style backends: every read swept `sweeps` times
        return float(info["sweeps"]) * num_reads * n
    return float("nan")


def compare(
    samplers: Mapping[str, BoltzmannSampler],
    h: torch.Tensor,
    W: torch.Tensor,
    num_reads: int,
    n_visible: int | None = None,
    reference: torch.Tensor | BoltzmannSampler | None = None,
    *,
    reference_reads: int | None = None,
    reference_sweeps: int = 2000,
    tv_floor_repeats: int = 5,
    seed: int = 0,
) -> pd.DataFrame:
    """Run every sampler once on the same problem and tabulate speed and accuracy.

    For problems of at most :data:`EXACT_COMPARE_UNITS` units (and no ``reference`` given) the
    samples are compared with the exact distribution; otherwise with reference samples, by
    default a long parallel-tempering run.

    Parameters
    ----------
    samplers
        Backends by display name.
    h, W
        Fields and symmetric zero-diagonal couplings.
    num_reads
        Samples drawn from each backend.
    n_visible
        Size of the first side of an RBM problem.
    reference
        Reference samples ``(N, n)``, or a sampler drawing them, instead of the default.
    reference_reads
        Reads of the reference sampler (default ``max(num_reads, 2048)``).
    reference_sweeps
        Burn-in rounds of the default parallel-tempering reference.
    tv_floor_repeats
        Exact draws of ``num_reads`` samples averaged for ``tv_floor``.
    seed
        Seed of the reference and of the floor estimate.

    Returns
    -------
    One row per backend: ``seconds``, ``samples_per_s``, ``spin_updates_per_s`` (from the
    backend's ``info``: ``spin_updates`` or ``sweeps``; NaN when unknown), ``reference``
    (``"exact"`` or ``"samples"``), ``tv`` (total variation to the exact distribution; NaN
    against reference samples), ``tv_floor`` (mean TV of exact samples of the same size: the
    noise floor of ``tv``), ``energy_w1`` (1-Wasserstein distance between energy
    distributions), ``mean_energy_error``, ``max_marginal_error`` (``max_i |E[z_i] -
    E_ref[z_i]|``), ``max_pairwise_error`` (``max_{i<j} |E[z_i z_j] - E_ref[z_i z_j]|``) and
    ``effective_beta`` when the backend reports one. Against reference samples the errors
    include the reference's own sampling noise.

    """
    h, W = h.detach(), W.detach()
    n = h.shape[0]
    cpu = dict(device="cpu", dtype=torch.float64)
    generator = torch.Generator().manual_seed(seed)
    if reference is None and n <= EXACT_COMPARE_UNITS:
        states, probs = exact_distribution(h.to(**cpu), W.to(**cpu))
        ref_marginals, ref_pairs = _moments(states, probs)
        ref_energies, ref_weights = boltzmann_energy(states, h.to(**cpu), W.to(**cpu)), probs
        exact_draws = (
            states[torch.multinomial(probs, num_reads, True, generator=generator)]
            for _ in range(tv_floor_repeats)
        )
        draws = [_total_variation(draw, probs) for draw in exact_draws]
        tv_floor, kind = float(np.mean(draws)), "exact"
    else:
        if reference is None:
            reference = ParallelTemperingSampler(
                n, burn_in=reference_sweeps, seed=seed, persistent=False
            )
        if isinstance(reference, BoltzmannSampler):
            reads = reference_reads or max(num_reads, 2048)
            reference = reference.sample(h, W, reads, n_visible=n_visible).samples
        reference = reference.detach().to(**cpu)
        probs = None
        ref_marginals, ref_pairs = _moments(reference)
        ref_energies = boltzmann_energy(reference, h.to(**cpu), W.to(**cpu))
        ref_weights, tv_floor, kind = None, float("nan"), "samples"

    rows = []
    for label, sampler in samplers.items():
        result = sampler.sample(h, W, num_reads, n_visible=n_visible)
        samples = result.samples.detach().to(**cpu)
        energies = result.energies.detach().to(**cpu)
        marginals, pairs = _moments(samples)
        seconds = float(result.info["seconds"])
        rows.append(
            {
                "sampler": label,
                "n_units": n,
                "num_reads": num_reads,
                "seconds": seconds,
                "samples_per_s": num_reads / seconds,
                "spin_updates_per_s": _spin_updates(result.info, num_reads, n) / seconds,
                "reference": kind,
                "tv": _total_variation(samples, probs) if probs is not None else float("nan"),
                "tv_floor": tv_floor,
                "energy_w1": wasserstein_distance(
                    energies.numpy(),
                    ref_energies.numpy(),
                    v_weights=None if ref_weights is None else ref_weights.numpy(),
                ),
                "mean_energy_error": float(
                    energies.mean()
                    - (ref_energies.mean() if ref_weights is None else ref_weights @ ref_energies)
                ),
                "max_marginal_error": float((marginals - ref_marginals).abs().max()),
                "max_pairwise_error": float((pairs - ref_pairs).abs().max()),
                "effective_beta": float(result.info.get("effective_beta", float("nan"))),
            }
        )
    return pd.DataFrame(rows).set_index("sampler")
