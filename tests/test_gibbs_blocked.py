"""The blocked dense Gibbs sweep: the same Markov kernel as the single-site scan, and exact."""

from __future__ import annotations

import pytest
import torch
from conftest import random_problem

from scqbm.prior import dense_gibbs_sweep, exact_distribution


def _problem(n, seed, scale=0.5):
    prior = random_problem(n, "bm", scale=scale, seed=seed)
    return prior.h.detach().double(), prior.coupling_matrix().detach().double()


@pytest.mark.parametrize("n", [5, 37, 130])
@pytest.mark.parametrize("block_size", [1, 3, 16, None, 500])
@pytest.mark.parametrize("compiled", [True, False])
def test_blocked_sweep_is_the_single_site_scan(n, block_size, compiled):
    # Same scan order and random numbers: the blocked evaluation must give the same states
    # as the reference single-site scan (float64, so no rounding can flip a decision).
    h, W = _problem(n, seed=n)
    gen = torch.Generator().manual_seed(1)
    z = torch.randint(0, 2, (24, n), generator=gen).double()
    settings = [
        {},
        {"order": torch.randperm(n, generator=gen)},
        {
            "field_scale": torch.rand(24, 1, generator=gen).double(),
            "coupling_scale": torch.rand(24, 1, generator=gen).double(),
        },
        {"coupling_scale": 0.3},
    ]
    for kwargs in settings:
        reference = dense_gibbs_sweep(
            z, h, W, scheme="single_site", generator=torch.Generator().manual_seed(7), **kwargs
        )
        blocked = dense_gibbs_sweep(
            z,
            h,
            W,
            scheme="blocked",
            block_size=block_size,
            compiled=compiled,
            generator=torch.Generator().manual_seed(7),
            **kwargs,
        )
        assert torch.equal(blocked, reference), kwargs
    # The input is not modified, and the sweep did something.
    assert not torch.equal(reference, z)


@pytest.mark.parametrize("n,block_size", [(10, 3), (12, 5)])
def test_blocked_sweep_matches_enumeration(n, block_size):
    h, W = _problem(n, seed=11, scale=0.6)
    states, probs = exact_distribution(h, W)
    marginals = probs @ states
    second = states.T @ (states * probs.unsqueeze(-1))
    gen = torch.Generator().manual_seed(0)
    n_chains = 2000
    z = torch.randint(0, 2, (n_chains, n), generator=gen).double()
    for _ in range(200):
        z = dense_gibbs_sweep(z, h, W, block_size=block_size, generator=gen)
    draws = []
    for _ in range(10):
        for _ in range(3):
            z = dense_gibbs_sweep(z, h, W, block_size=block_size, generator=gen)
        draws.append(z)
    samples = torch.cat(draws)
    # Independent chains; a chain's 10 draws (3 sweeps apart) count as 5 effective samples.
    n_eff = n_chains * 5
    se_marg = (marginals * (1 - marginals) / n_eff).sqrt()
    assert torch.all((samples.mean(0) - marginals).abs() < 5 * se_marg + 1e-3)
    emp_second = samples.T @ samples / len(samples)
    se_pair = (second * (1 - second) / n_eff).sqrt()
    assert torch.all((emp_second - second).abs() < 5 * se_pair + 1e-3)
    # The couplings matter here: a sampler of independent units would fail the check above.
    independent = torch.outer(marginals, marginals)
    off = ~torch.eye(n, dtype=torch.bool)
    assert ((second - independent).abs() > 5 * se_pair + 1e-3)[off].any()
    bits = 2 ** torch.arange(n - 1, -1, -1)
    codes = (samples.long() * bits).sum(-1)
    empirical = torch.bincount(codes, minlength=2**n).double() / len(samples)
    tv = 0.5 * (empirical[(states.long() * bits).sum(-1)] - probs).abs().sum().item()
    # E[TV] of an empirical distribution is at most 0.5 sqrt(K / N) for K states.
    assert tv < 0.5 * (2**n / n_eff) ** 0.5


def test_float32_blocked_sweep_close_to_reference():
    # In float32 the matrix products round differently; only decisions on a knife edge differ.
    h, W = _problem(200, seed=3, scale=0.1)
    z = torch.randint(0, 2, (64, 200), generator=torch.Generator().manual_seed(0)).float()
    a = dense_gibbs_sweep(z, h.float(), W.float(), generator=torch.Generator().manual_seed(2))
    b = dense_gibbs_sweep(
        z, h.float(), W.float(), scheme="single_site", generator=torch.Generator().manual_seed(2)
    )
    assert a.dtype == torch.float32 and (a != b).double().mean() < 1e-3


def test_bad_scheme_and_block_size():
    h, W = _problem(4, seed=0)
    z = torch.zeros(2, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="scheme"):
        dense_gibbs_sweep(z, h, W, scheme="chromatic")
    with pytest.raises(ValueError, match="block_size"):
        dense_gibbs_sweep(z, h, W, block_size=0)
