"""KL(q || p) of the module and its gradients against brute-force enumeration."""

from __future__ import annotations

import pytest
import torch

from scqbm.module import QBMVAEModule
from scqbm.prior import enumerate_states, exact_distribution

N_LATENT = 8


def make_module(prior: str) -> QBMVAEModule:
    torch.manual_seed(0)
    module = QBMVAEModule(n_input=5, n_batch=1, n_latent=N_LATENT, prior=prior)
    with torch.no_grad():
        module.prior.h.normal_(0, 0.5)
        module.prior.couplings.normal_(0, 0.4)
    module.refresh_log_partition()
    return module


def brute_force_kl(module, logits):
    """sum_z q(z) [log q(z) - log p(z)] over all 2**n states, differentiable everywhere."""
    states = enumerate_states(N_LATENT, dtype=torch.float64)
    h = module.prior.h.double()
    W = module.prior.coupling_matrix().double()
    log_p_unnorm = states @ h + ((states @ W) * states).sum(-1)
    log_p = log_p_unnorm - torch.logsumexp(log_p_unnorm, 0)
    log_q = (
        torch.distributions.Bernoulli(logits=logits.double().unsqueeze(1)).log_prob(states).sum(-1)
    )
    return (log_q.exp() * (log_q - log_p)).sum(-1)


@pytest.mark.parametrize("prior", ["bm", "rbm"])
def test_kl_value_is_exact(prior):
    module = make_module(prior)
    logits = torch.randn(6, N_LATENT) * 2
    ours = module.kl_divergence_z(logits).double()
    assert torch.allclose(ours, brute_force_kl(module, logits), atol=1e-4)
    assert torch.all(ours > -1e-5)


@pytest.mark.parametrize("prior", ["bm", "rbm"])
def test_kl_gradient_wrt_encoder_logits_is_exact(prior):
    module = make_module(prior)
    logits = (torch.randn(4, N_LATENT) * 1.5).requires_grad_()
    (ours,) = torch.autograd.grad(module.kl_divergence_z(logits).sum(), logits)
    logits64 = logits.detach().double().requires_grad_()
    (exact,) = torch.autograd.grad(brute_force_kl(module, logits64).sum(), logits64)
    assert torch.allclose(ours.double(), exact, atol=1e-4)


@pytest.mark.parametrize("prior", ["bm", "rbm"])
def test_kl_gradient_wrt_prior_from_negative_samples(prior):
    """Positive phase minus negative phase: with exact samples of p, the sampled gradient
    matches the exact one within a tolerance from the sample size."""
    module = make_module(prior)
    logits = torch.randn(5, N_LATENT)
    params = [module.prior.h, module.prior.couplings]

    exact = torch.autograd.grad(brute_force_kl(module, logits.double()).sum(), params)

    states, probs = exact_distribution(
        module.prior.h.detach(), module.prior.coupling_matrix().detach()
    )
    generator = torch.Generator().manual_seed(0)
    n_samples = 100_000
    samples = states[torch.multinomial(probs, n_samples, replacement=True, generator=generator)]
    ours = torch.autograd.grad(module.kl_divergence_z(logits, samples).sum(), params)

    # Standard errors of the negative phase: per sample, -dE/dh = z and -dE/dcoupling = 2 z_i z_j
    # (each coupling stands for the pair W_ij = W_ji); the batch has 5 cells.
    prior = module.prior
    if prior.structure == "bm":
        pair = samples[:, prior._rows] * samples[:, prior._cols]
    else:
        nv = prior.n_visible
        pair = (samples[:, :nv, None] * samples[:, None, nv:]).reshape(n_samples, -1)
    se_h = 5 * samples.std(0) / n_samples**0.5
    se_w = 5 * 2 * pair.std(0) / n_samples**0.5
    assert torch.all((ours[0] - exact[0].float()).abs() < 5 * se_h + 1e-4)
    assert torch.all((ours[1].reshape(-1) - exact[1].float().reshape(-1)).abs() < 5 * se_w + 1e-4)


def test_negative_samples_change_the_gradient_not_the_value():
    module = make_module("rbm")
    logits = torch.randn(3, N_LATENT)
    samples = torch.bernoulli(torch.full((64, N_LATENT), 0.5))
    assert torch.allclose(module.kl_divergence_z(logits), module.kl_divergence_z(logits, samples))
