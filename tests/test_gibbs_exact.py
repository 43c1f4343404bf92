"""The native Gibbs sampler against exact enumeration (marginals, correlations, TV)."""

from __future__ import annotations

import pytest
import torch
from conftest import random_problem

from scqbm.prior import enumerate_states, exact_distribution
from scqbm.samplers import GibbsSampler, SamplerError, make_sampler


def exact_moments(h, W):
    states, probs = exact_distribution(h.double(), W.double())
    marginals = probs @ states
    second = states.T @ (states * probs.unsqueeze(-1))
    return states, probs, marginals, second


def collect(sampler, prior, n_calls):
    h, W = prior.h.detach(), prior.coupling_matrix().detach()
    draws = [
        sampler.sample(h, W, sampler.num_chains, n_visible=prior.n_visible).samples
        for _ in range(n_calls)
    ]
    return torch.cat(draws).double()


@pytest.mark.parametrize("structure,n", [("bm", 10), ("rbm", 12)])
def test_persistent_gibbs_matches_enumeration(structure, n):
    prior = random_problem(n, structure, scale=0.5, seed=5)
    sampler = GibbsSampler(n, num_chains=2000, num_sweeps=3, burn_in=200, seed=0)
    samples = collect(sampler, prior, n_calls=10)
    states, probs, marginals, second = exact_moments(
        prior.h.detach(), prior.coupling_matrix().detach()
    )
    # Chains are independent; successive calls of one chain are correlated, so count each
    # chain's 10 draws as 5 effective samples (3 sweeps apart, well mixed at this coupling).
    n_eff = 2000 * 5
    se_marg = (marginals * (1 - marginals) / n_eff).sqrt()
    assert torch.all((samples.mean(0) - marginals).abs() < 5 * se_marg + 1e-3)
    emp_second = samples.T @ samples / len(samples)
    se_pair = (second * (1 - second) / n_eff).sqrt()
    assert torch.all((emp_second - second).abs() < 5 * se_pair + 1e-3)
    # Total variation against the exact distribution over all 2**n states.
    codes = (samples.long() * (2 ** torch.arange(n - 1, -1, -1))).sum(-1)
    empirical = torch.bincount(codes, minlength=2**n).double() / len(samples)
    exact_codes = (states.long() * (2 ** torch.arange(n - 1, -1, -1))).sum(-1)
    tv = 0.5 * (empirical[exact_codes] - probs).abs().sum().item()
    # E[TV] of an empirical distribution is at most 0.5 sqrt(K / N) for K states.
    assert tv < 0.5 * (2**n / n_eff) ** 0.5


def test_dense_sweep_is_not_a_synchronous_update():
    # Two strongly coupled units: a synchronous update oscillates between 01 and 10, a Gibbs
    # sampler spends most time in 00/11 (ferromagnet with zero field balance).
    h = torch.tensor([-2.0, -2.0])
    W = torch.tensor([[0.0, 2.0], [2.0, 0.0]])
    sampler = GibbsSampler(2, num_chains=4000, num_sweeps=2, burn_in=50, seed=1)
    samples = sampler.sample(h, W, 4000).samples
    _, probs = exact_distribution(h, W)  # states 00, 01, 10, 11
    agree = (samples[:, 0] == samples[:, 1]).double().mean().item()
    assert agree == pytest.approx((probs[0] + probs[3]).item(), abs=0.03)


def test_chain_state_is_a_buffer_updated_in_place_and_fresh_chains_leave_it():
    prior = random_problem(6, "rbm")
    sampler = GibbsSampler(6, num_chains=32, num_sweeps=1, burn_in=5, seed=0)
    assert "state" in sampler.state_dict() and "initialized" in sampler.state_dict()
    buffer = sampler.state
    first = sampler.sample(prior.h, prior.coupling_matrix(), 32, n_visible=3).samples
    assert sampler.state is buffer and torch.equal(sampler.state, first)
    saved = sampler.state.clone()
    fresh = sampler.sample(prior.h, prior.coupling_matrix(), 50, n_visible=3)
    assert fresh.num_reads == 50 and not fresh.info["persistent"]
    assert torch.equal(sampler.state, saved)
    # Energies are those of the returned samples.
    assert torch.allclose(fresh.energies, prior.energy(fresh.samples))


def test_sampler_registry_and_input_validation():
    sampler = make_sampler("gibbs", 4, num_chains=8)
    assert isinstance(sampler, GibbsSampler) and sampler.num_chains == 8
    with pytest.raises(ValueError, match="Unknown sampler"):
        make_sampler("quantum_magic", 4)
    with pytest.raises(TypeError, match="sampler_kwargs"):
        make_sampler("gibbs", 4, n_chains=8)
    h = torch.zeros(3)
    with pytest.raises(ValueError, match="symmetric"):
        sampler.sample(h, torch.tensor([[0, 1.0, 0], [0, 0, 0], [0, 0, 0]]), 4)
    with pytest.raises(ValueError, match="NaN"):
        sampler.sample(torch.tensor([0, float("nan"), 0]), torch.zeros(3, 3), 4)
    with pytest.raises(ValueError, match="diagonal"):
        sampler.sample(h, torch.eye(3), 4)
    assert issubclass(SamplerError, RuntimeError)
    assert enumerate_states(2).tolist() == [[0, 0], [0, 1], [1, 0], [1, 1]]
