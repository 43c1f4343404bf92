"""The training step's sampling path does only the work training needs, and the same maths."""

from __future__ import annotations

import pytest
import torch

from scqbm.module import QBMVAEModule
from scqbm.prior import BoltzmannPrior, boltzmann_energy
from scqbm.samplers import GibbsSampler, SampleSet
from scqbm.samplers import _base as sampler_base


def _problem(n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, generator=g)
    W = torch.randn(n, n, generator=g).triu(1) * 0.3
    return h, W + W.T


def test_sample_set_energies_are_computed_on_demand_and_exact():
    h, W = _problem()
    result = GibbsSampler(12, num_chains=16, seed=1).sample(h, W, 16)
    assert result._energies is None  # nothing computed until asked for
    torch.testing.assert_close(result.energies, boltzmann_energy(result.samples, h, W))
    assert result.num_reads == 16
    with pytest.raises(ValueError, match="energies or the problem"):
        SampleSet(result.samples)


def test_check_false_skips_validation_only_when_asked():
    h, W = _problem()
    asymmetric = W.clone()
    asymmetric[0, 1] += 1.0
    sampler = GibbsSampler(12, num_chains=8, seed=0)
    with pytest.raises(ValueError, match="symmetric"):
        sampler.sample(h, asymmetric, 8)
    assert sampler.sample(h, W, 8, check=False).samples.shape == (8, 12)


def test_training_negative_phase_does_not_revalidate(monkeypatch):
    module = QBMVAEModule(n_input=20, n_latent=10, sampler_kwargs={"num_chains": 32})

    def forbidden(*args, **kwargs):
        raise AssertionError("validate_problem called in the training step")

    monkeypatch.setattr(sampler_base, "validate_problem", forbidden)
    result = module.sample_negative_phase()
    assert result.samples.shape == (32, 10)


@pytest.mark.parametrize("structure", ["bm", "rbm"])
def test_moment_surrogate_matches_per_sample_energy_gradient(structure):
    torch.manual_seed(0)
    prior = BoltzmannPrior(10, structure=structure, log_partition="exact")
    with torch.no_grad():
        prior.h.normal_()
        prior.couplings.normal_(std=0.3)
    prior.refresh()
    logits = torch.randn(4, 10)
    z = torch.bernoulli(torch.full((64, 10), 0.4))

    prior.zero_grad()
    prior.kl(logits, z).sum().backward()
    got = [p.grad.clone() for p in prior.parameters()]

    # Reference: the positive phase plus the mean of per-sample energies, by autograd.
    prior.zero_grad()
    W = prior.coupling_matrix()
    probs = torch.sigmoid(logits)
    # The log Z term enters every cell's KL: its gradient counts once per cell.
    n_cells = logits.shape[0]
    reference = prior.expected_energy(probs, W).sum() - n_cells * prior.energy(z, W).mean()
    reference.backward()
    for a, b in zip(got, (p.grad for p in prior.parameters()), strict=True):
        torch.testing.assert_close(a, b)


def test_chain_state_flag_is_read_once_and_follows_loads():
    h, W = _problem()
    sampler = GibbsSampler(12, num_chains=8, num_sweeps=1, burn_in=50, seed=0)
    assert sampler.sample(h, W, 8).info["sweeps"] == 51  # first use burns in
    assert sampler.sample(h, W, 8).info["sweeps"] == 1
    restored = GibbsSampler(12, num_chains=8, num_sweeps=1, burn_in=50, seed=0)
    restored.load_state_dict(sampler.state_dict())
    assert restored.sample(h, W, 8).info["sweeps"] == 1  # loaded chains are burnt in
    restored.reset()
    assert restored.sample(h, W, 8).info["sweeps"] == 51
    fresh = GibbsSampler(12, num_chains=8, num_sweeps=1, burn_in=50, seed=0)
    restored.load_state_dict(fresh.state_dict())  # chains never run: burn in again
    assert restored.sample(h, W, 8).info["sweeps"] == 51
