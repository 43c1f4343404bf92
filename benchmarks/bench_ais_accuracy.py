"""AIS against the exact log Z of trained 32-unit dense priors.

Exact log Z of a dense Boltzmann machine is beyond the package's enumeration limit (2**20
states) at the default ``n_latent=32``, but it can be computed here once per prior by
splitting the units into two halves ``a`` and ``b`` of 16: for every state of ``a`` the sum
over the 2**16 states of ``b`` is one row of a (2**16, 2**16) matrix of energies, built from a
matrix product in chunks (2**32 states in about 2-3 CPU minutes).

For each saved model (a ``model/model.pt`` of a suite run's cache, or a model saved with
``QBMVAE.save``) it prints the exact value, the stored final estimate (1,024 chains x 1,000
temperatures) and repeated fresh AIS runs with the routine (256 x 500) and the final
settings, as differences from exact with their reported standard errors. The split
enumeration checks itself against ``exact_log_partition`` on a 16-unit machine first.

With ``--chains`` the exact mean energy and unit marginals of the prior (from the same
pass) are compared with the model's saved persistent training chains (the negative
phase at the end of training) and with fresh Gibbs chains after 1,000 sweeps: whether the
negative samples that the prior's gradient and the importance-sampling updates of log Z rely
on follow the prior.

Usage::

    python benchmarks/bench_ais_accuracy.py CACHE/.../seed0/model/model.pt ... \\
        | tee benchmarks/results/ais_accuracy.log
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from scqbm.prior import (
    BoltzmannPrior,
    boltzmann_energy,
    enumerate_states,
    exact_distribution,
    exact_log_partition,
)

_ROWS_PER_CHUNK = 1024


def split_exact(h: torch.Tensor, W: torch.Tensor) -> tuple[float, float, torch.Tensor]:
    """Exact log Z, ``E_p[E(z)]`` and marginals ``p(z_i = 1)`` of a dense machine (float64).

    One pass over the chunks with a running maximum (streaming log-sum-exp), so that the
    moments cost little more than log Z alone.
    """
    n = h.numel()
    k = n // 2
    h, W = h.double(), W.double()
    a = enumerate_states(k, dtype=torch.float64)
    b = enumerate_states(n - k, dtype=torch.float64)
    # -E(z) = h.z + z'Wz split into the halves' own energies and the cross term 2 a'W_ab b.
    own_a = -boltzmann_energy(a, h[:k], W[:k, :k])
    own_b = -boltzmann_energy(b, h[k:], W[k:, k:])
    cross = 2.0 * (a @ W[:k, k:])
    top = -math.inf
    mass = torch.zeros((), dtype=torch.float64)
    energy = torch.zeros((), dtype=torch.float64)
    marginals = torch.zeros(n, dtype=torch.float64)
    for start in range(0, a.shape[0], _ROWS_PER_CHUNK):
        stop = start + _ROWS_PER_CHUNK
        neg_energy = own_a[start:stop, None] + own_b[None, :] + cross[start:stop] @ b.T
        chunk_top = float(neg_energy.max())
        if chunk_top > top:  # rescale what was accumulated to the new maximum
            scale = math.exp(top - chunk_top)
            mass, energy, marginals = mass * scale, energy * scale, marginals * scale
            top = chunk_top
        p = torch.exp(neg_energy - top)
        mass += p.sum()
        energy -= (p * neg_energy).sum()
        marginals[:k] += p.sum(1) @ a[start:stop]
        marginals[k:] += p.sum(0) @ b
    return top + math.log(float(mass)), float(energy / mass), marginals / mass


@torch.no_grad()
def _compare_chains(
    prior: BoltzmannPrior, mean_energy: float, marginals: torch.Tensor, chains: torch.Tensor
) -> None:
    fresh = prior.sample(chains.shape[0], burn_in=1_000, seed=0)
    for name, z in (("persistent training chains", chains), ("fresh chains, 1,000 sweeps", fresh)):
        energies = prior.energy(z.to(prior.h.dtype)).double()
        se = float(energies.std() / energies.numel() ** 0.5)
        offset = float(energies.mean()) - mean_energy
        gap = (z.double().mean(0) - marginals).abs()
        print(
            f"  {name} ({z.shape[0]}): mean energy {offset:+.2f} from exact {mean_energy:.2f} "
            f"({offset / se:+.1f} se); marginals off by {float(gap.mean()):.3f} on average, "
            f"{float(gap.max()):.3f} at most"
        )


@torch.no_grad()
def _self_check() -> None:
    torch.manual_seed(0)  # the couplings' initialisation
    generator = torch.Generator().manual_seed(0)
    prior = BoltzmannPrior(16, "bm", init_scale=0.5)
    prior.h.copy_(torch.randn(16, generator=generator))
    h, W = prior.h.detach(), prior.coupling_matrix().detach()
    log_z, mean_energy, marginals = split_exact(h, W)
    expected = float(exact_log_partition(h.double(), W.double()))
    states, probs = exact_distribution(h.double(), W.double())
    expected_energy = float(probs @ prior.energy(states.float()).double())
    if (
        abs(log_z - expected) > 1e-6
        or abs(mean_energy - expected_energy) > 1e-4
        or not torch.allclose(marginals, probs @ states, atol=1e-8)
    ):
        raise SystemExit("the split enumeration disagrees with exact_distribution")
    print(f"self-check, 16 units: log Z {log_z:.6f}, mean energy and marginals as exact")


def _prior_of(path: str) -> tuple[BoltzmannPrior, float, float, torch.Tensor | None]:
    state = torch.load(path, map_location="cpu", weights_only=False)["model_state_dict"]
    h, couplings = state["prior.h"], state["prior.couplings"]
    n = h.numel()
    if couplings.numel() != n * (n - 1) // 2:
        raise SystemExit(f"{path}: not a dense ('bm') prior")
    prior = BoltzmannPrior(n, "bm", log_partition="ais")
    with torch.no_grad():
        prior.h.copy_(h)
        prior.couplings.copy_(couplings)
    chains = state.get("sampler.state")
    if chains is not None and "sampler.betas" in state:
        # Parallel tempering keeps every replica, hottest last: the target (beta = 1) first.
        chains = chains.reshape(state["sampler.betas"].numel(), -1, n)[0]
    return prior, float(state["prior.log_z"]), float(state["prior.log_z_stderr"]), chains


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", help="model.pt files of dense 32-unit QBMVAEs")
    parser.add_argument("--repeats", type=int, default=3, help="fresh AIS runs per setting")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--chains", action="store_true", help="also compare the saved chains with exact moments"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    _self_check()
    settings = {"routine 256x500": (256, 500), "final 1024x1000": (1024, 1000)}
    worst = dict.fromkeys(settings, 0.0)
    for path in args.models:
        prior, stored, stored_se, saved_chains = _prior_of(path)
        if prior.n_units > 32:
            raise SystemExit(f"{path}: {prior.n_units} units, more than this script enumerates")
        W = prior.coupling_matrix().detach()
        start = time.perf_counter()
        exact, mean_energy, marginals = split_exact(prior.h.detach(), W)
        seconds = time.perf_counter() - start
        print(
            f"{path}\n  exact {exact:.3f} ({seconds:.0f} s); stored final estimate "
            f"{stored - exact:+.3f} (se {stored_se:.3f}); max |W| {W.abs().max():.2f}, "
            f"max row sum |W| {W.abs().sum(1).max():.1f}"
        )
        for name, (n_chains, n_betas) in settings.items():
            runs = [
                prior.log_partition("ais", n_chains=n_chains, n_betas=n_betas)
                for _ in range(args.repeats)
            ]
            worst[name] = max(worst[name], *(abs(r.value - exact) for r in runs))
            shown = ", ".join(f"{r.value - exact:+.3f} (se {r.stderr:.3f})" for r in runs)
            print(f"  AIS {name}: {shown}")
        if args.chains and saved_chains is not None:
            _compare_chains(prior, mean_energy, marginals, saved_chains)
    for name, value in worst.items():
        print(f"largest |AIS - exact|, {name}: {value:.3f} nats")


if __name__ == "__main__":
    main()
