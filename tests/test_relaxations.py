"""Relaxations: inverse CDF, CDF and mean against numerical integration and sampling."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from scqbm.nn import (
    OverlappingExponential,
    SpikeAndExponential,
    bernoulli_entropy,
    make_relaxation,
)

RELAXATIONS = [SpikeAndExponential, OverlappingExponential]


def conditional_densities(cls, beta, x):
    """r(zeta|0), r(zeta|1) on a grid (the spike has no density; it is handled apart)."""
    r1 = beta * np.exp(beta * x) / np.expm1(beta)
    if cls is SpikeAndExponential:
        return None, r1
    r0 = beta * np.exp(-beta * x) / (1 - np.exp(-beta))
    return r0, r0[::-1]


@pytest.mark.parametrize("cls", RELAXATIONS)
@pytest.mark.parametrize("beta", [3.0, 10.0])
def test_cdf_matches_integrated_density(cls, beta):
    q = torch.tensor([0.05, 0.3, 0.5, 0.9])
    relax = cls(torch.logit(q), beta)
    x = np.linspace(0, 1, 20001)
    r0, r1 = conditional_densities(cls, beta, x)
    for k, qk in enumerate(q.tolist()):
        dens = qk * r1 + (0 if r0 is None else (1 - qk) * r0)
        cum = np.concatenate([[0], np.cumsum((dens[1:] + dens[:-1]) / 2 * np.diff(x))])
        if cls is SpikeAndExponential:
            cum = cum + (1 - qk)  # the point mass at 0
        grid = torch.tensor(x[::1000], dtype=torch.float32)
        analytic = relax.cdf(grid.unsqueeze(-1).expand(-1, 4))[:, k].numpy()
        np.testing.assert_allclose(analytic, cum[::1000], atol=2e-4)


@pytest.mark.parametrize("cls", RELAXATIONS)
@pytest.mark.parametrize("beta", [3.0, 10.0])
def test_icdf_inverts_cdf(cls, beta):
    q = torch.tensor([0.02, 0.4, 0.97])
    relax = cls(torch.logit(q), beta)
    rho = torch.linspace(0.001, 0.999, 500, dtype=torch.float64).unsqueeze(-1).expand(-1, 3)
    relax64 = cls(torch.logit(q.double()), beta)
    zeta = relax64.icdf(rho)
    assert torch.all((zeta >= 0) & (zeta <= 1))
    recovered = relax64.cdf(zeta)
    if cls is SpikeAndExponential:
        on_spike = rho <= 1 - q.double()
        assert torch.all(zeta[on_spike] == 0)
        assert torch.allclose(recovered[~on_spike], rho[~on_spike], atol=1e-6)
    else:
        assert torch.allclose(recovered, rho, atol=1e-6)
    assert relax.rsample((4,)).shape == (4, 3)


@pytest.mark.parametrize("cls", RELAXATIONS)
def test_mean_matches_integral_and_samples(cls):
    beta = 8.0
    q = torch.tensor([0.1, 0.5, 0.8])
    relax = cls(torch.logit(q), beta)
    x = np.linspace(0, 1, 200001)
    r0, r1 = conditional_densities(cls, beta, x)
    for k, qk in enumerate(q.tolist()):
        dens = qk * x * r1 + (0 if r0 is None else (1 - qk) * x * r0)
        integral = np.sum((dens[1:] + dens[:-1]) / 2 * np.diff(x))
        assert relax.mean[k].item() == pytest.approx(integral, abs=1e-5)
    torch.manual_seed(0)
    n = 200_000
    draws = relax.rsample((n,))
    se = draws.std(0) / math.sqrt(n)
    assert torch.all((draws.mean(0) - relax.mean).abs() < 5 * se)


@pytest.mark.parametrize("cls", RELAXATIONS)
def test_sampling_distribution_matches_cdf_ks(cls):
    torch.manual_seed(1)
    q = torch.tensor([0.35])
    relax = cls(torch.logit(q), 6.0)
    n = 50_000
    draws = relax.rsample((n,)).squeeze(-1).sort().values
    # Right-continuous empirical CDF (the spike puts many ties at 0).
    empirical = torch.searchsorted(draws, draws, right=True) / n
    gap = (relax.cdf(draws.unsqueeze(-1)).squeeze(-1) - empirical).abs().max().item()
    # Kolmogorov-Smirnov 0.1% critical value 1.95 / sqrt(n).
    assert gap < 1.95 / math.sqrt(n) + 1.0 / n


@pytest.mark.parametrize("cls", RELAXATIONS)
def test_conditional_sampling_matches_mixture(cls):
    # zeta ~ r(.|z) with z ~ Bernoulli(q) has the same law as the mixture's rsample.
    torch.manual_seed(2)
    q = torch.full((100_000, 1), 0.3)
    relax = cls(torch.logit(q), 5.0)
    mixture = relax.rsample().squeeze(-1).sort().values
    conditional = relax.sample_conditional(torch.bernoulli(q)).squeeze(-1).sort().values
    quantiles = torch.linspace(0.05, 0.95, 19)
    idx = (quantiles * (len(mixture) - 1)).long()
    assert torch.allclose(mixture[idx], conditional[idx], atol=0.02)


def test_reparameterised_gradient_flows_to_logits():
    logits = torch.zeros(1000, 4, requires_grad=True)
    relax = SpikeAndExponential(logits, 10.0)
    relax.rsample().sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


@pytest.mark.parametrize("cls", RELAXATIONS)
@pytest.mark.parametrize("beta", [3.0, 10.0, 30.0])
def test_reparameterised_gradient_is_finite_for_extreme_probabilities(cls, beta):
    """Saturated encoders (|logit| up to 30) must not produce NaN gradients (float32)."""
    torch.manual_seed(0)
    logits = torch.linspace(-30.0, 30.0, 601).repeat(20, 1).requires_grad_()
    relax = cls(logits, beta)
    relax.rsample().sum().backward()
    assert torch.isfinite(logits.grad).all()


def test_entropy_matches_definition_and_names_are_validated():
    logits = torch.tensor([[-30.0, -1.0, 0.0, 2.0, 30.0]])
    q = torch.sigmoid(logits.double())
    expected = -(q * q.log() + (1 - q) * (1 - q).log()).nan_to_num().sum()
    assert bernoulli_entropy(logits).item() == pytest.approx(expected.item(), abs=1e-6)
    with pytest.raises(ValueError, match="Unknown relaxation"):
        make_relaxation("gumbel", logits, 1.0)
    with pytest.raises(ValueError, match="beta"):
        make_relaxation("spike_exp", logits, 0.0)
