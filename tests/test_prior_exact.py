"""The prior's maths against brute-force enumeration (<= 16 units)."""

from __future__ import annotations

import itertools
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import random_problem

from scqbm.prior import (
    BoltzmannPrior,
    LatentTooLargeError,
    ais_log_partition,
    bipartite_energy,
    boltzmann_energy,
    enumerate_states,
    exact_distribution,
    gibbs_sweep,
)


def brute_force_log_z(h, W):
    states = enumerate_states(h.shape[0], dtype=torch.float64)
    h, W = h.double(), W.double()
    energies = -(states @ h) - ((states @ W) * states).sum(-1)
    return torch.logsumexp(-energies, 0)


@pytest.mark.parametrize("structure", ["bm", "rbm"])
def test_coupling_matrix_is_symmetric_zero_diagonal_and_structured(structure):
    prior = random_problem(10, structure)
    W = prior.coupling_matrix()
    assert torch.equal(W, W.T)
    assert torch.all(W.diagonal() == 0)
    if structure == "rbm":
        nv = prior.n_visible
        assert torch.all(W[:nv, :nv] == 0) and torch.all(W[nv:, nv:] == 0)
        assert torch.count_nonzero(W[:nv, nv:]) == nv * (10 - nv)


def test_energy_matches_definition_pairwise_sum():
    prior = random_problem(7, "bm")
    W = prior.coupling_matrix().double()
    z = enumerate_states(7, dtype=torch.float64)
    pairwise = sum(2 * W[i, j] * z[:, i] * z[:, j] for i in range(7) for j in range(i + 1, 7))
    expected = -(z @ prior.h.double()) - pairwise
    assert torch.allclose(prior.energy(z.float()).double(), expected, atol=1e-5)


@pytest.mark.parametrize("n_visible", [3, 5, 8])
def test_rbm_block_energy_is_the_dense_energy(n_visible):
    # Every state of an uneven split, and probabilities with a leading sample dimension.
    prior = BoltzmannPrior(11, structure="rbm", n_visible=n_visible, init_scale=0.7)
    with torch.no_grad():
        prior.h.normal_()
    W = prior.coupling_matrix()
    states = enumerate_states(11)
    assert torch.allclose(prior.energy(states), boltzmann_energy(states, prior.h, W), atol=1e-5)
    probs = torch.rand(4, 6, 11)
    block = bipartite_energy(probs, prior.h, prior.coupling_block())
    assert torch.allclose(block, boltzmann_energy(probs, prior.h, W), atol=1e-5)
    assert BoltzmannPrior(6, structure="bm").coupling_block() is None


def test_rbm_log_z_ratio_uses_the_parameter_change_of_the_dense_energy():
    prior = random_problem(12, "rbm", scale=0.4, seed=2)
    prior.log_partition_method = "ais"
    prior.refresh(n_chains=64, n_betas=20)
    h_ref, W_ref = prior.h.detach().clone(), prior.coupling_matrix().detach().clone()
    with torch.no_grad():
        prior.h.add_(0.03)
        prior.couplings.mul_(1.05)
    samples = torch.rand(200, 12).round()
    log_w = boltzmann_energy(samples, prior.h, prior.coupling_matrix())
    log_w = log_w - boltzmann_energy(samples, h_ref, W_ref)
    expected = torch.logsumexp(log_w.detach(), 0) - math.log(200)
    assert prior.log_z_ratio(samples).value == pytest.approx(float(expected), abs=1e-4)


def test_rbm_ais_is_the_generic_path_with_the_same_random_numbers():
    # The RBM's fused loop must give the weights of the generic one: E_b with the dense W and
    # a block Gibbs sweep at each b, drawing the same uniforms in the same order.
    prior = random_problem(14, "rbm", scale=0.6, seed=5)
    h, W, nv = prior.h.detach(), prior.coupling_matrix().detach(), prior.n_visible
    n_chains, n_betas = 64, 50
    generator = torch.Generator().manual_seed(7)
    z = (torch.rand(n_chains, 14, generator=generator) < torch.sigmoid(h)).float()
    log_w = torch.zeros(n_chains)
    betas = torch.linspace(0.0, 1.0, n_betas + 1).tolist()
    for b_prev, b in itertools.pairwise(betas):
        log_w -= (b - b_prev) * boltzmann_energy(z, torch.zeros_like(h), W)
        z = gibbs_sweep(z, h, W, nv, coupling_scale=b, generator=generator)
    expected = F.softplus(h).sum() + torch.logsumexp(log_w, 0) - math.log(n_chains)
    fused = ais_log_partition(
        h, W, nv, n_chains=n_chains, n_betas=n_betas, generator=torch.Generator().manual_seed(7)
    )
    assert fused.value == pytest.approx(float(expected), abs=1e-4)


@pytest.mark.parametrize("structure,n", [("bm", 12), ("rbm", 14), ("rbm", 9)])
def test_exact_log_partition_matches_enumeration(structure, n):
    prior = random_problem(n, structure, scale=0.8, seed=n)
    expected = brute_force_log_z(prior.h, prior.coupling_matrix())
    assert prior.log_partition_exact().item() == pytest.approx(expected.item(), abs=1e-4)
    estimate = prior.log_partition("exact")
    assert estimate.stderr == 0.0 and estimate.method == "exact"


def test_rbm_enumerates_the_smaller_side():
    prior = BoltzmannPrior(10, structure="rbm", n_visible=7, init_scale=0.7)
    expected = brute_force_log_z(prior.h, prior.coupling_matrix())
    assert prior.log_partition_exact().item() == pytest.approx(expected.item(), abs=1e-4)
    # 40 units split 20/20 are still exact; a 30-unit dense machine is not.
    assert BoltzmannPrior(40, "rbm").can_enumerate()
    assert not BoltzmannPrior(30, "bm").can_enumerate()


def test_exact_log_partition_gradient_is_minus_expected_energy_gradient():
    # d log Z / d h = E_p[z]; d log Z / d W_ij = E_p[z_i z_j] (times 2 for the pair).
    prior = random_problem(8, "bm", scale=0.6, seed=3)
    log_z = prior.log_partition_exact()
    (grad_h,) = torch.autograd.grad(log_z, prior.h)
    states, probs = exact_distribution(prior.h.detach(), prior.coupling_matrix().detach())
    assert torch.allclose(grad_h, probs @ states, atol=1e-5)


def test_too_large_exact_is_a_clear_error():
    prior = BoltzmannPrior(24, "bm")
    with pytest.raises(LatentTooLargeError, match="ais"):
        prior.log_partition("exact")


@pytest.mark.parametrize("structure", ["bm", "rbm"])
def test_ais_agrees_with_exact_within_its_standard_error(structure):
    prior = random_problem(14, structure, scale=0.6, seed=11)
    exact = prior.log_partition_exact().item()
    generator = torch.Generator().manual_seed(0)
    estimate = ais_log_partition(
        prior.h,
        prior.coupling_matrix(),
        prior.n_visible,
        n_chains=512,
        n_betas=300,
        generator=generator,
    )
    assert estimate.stderr > 0
    # AIS is unbiased in Z, slightly biased low in log Z; allow 5 standard errors + 0.02.
    assert abs(estimate.value - exact) < 5 * estimate.stderr + 0.02


def test_auto_uses_ais_beyond_enumeration():
    prior = BoltzmannPrior(26, "bm", init_scale=0.05)
    estimate = prior.log_partition("auto", n_chains=64, n_betas=50)
    assert estimate.method == "ais"
    # Weak couplings: log Z is close to that of the factorial machine, 26 log 2.
    assert estimate.value == pytest.approx(26 * math.log(2), abs=0.5)


@pytest.mark.parametrize("inference", [True, False])
def test_exact_value_builds_no_graph(inference):
    # A query under inference mode leaves it for the cached states; grad mode must stay off,
    # or torch warns about converting a tensor that requires grad (seen with the RBM default).
    prior = BoltzmannPrior(32, "rbm")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.inference_mode(inference):
            estimate = prior.log_partition("auto")
    assert estimate.method == "exact"


def _summed_out_log_z(h, W, n_visible):
    # The textbook form of the RBM's exact log Z, in float64: every state of the first side,
    # the second summed out with softplus (no split into halves, no chunks).
    h, W = h.double(), W.double()
    states = enumerate_states(n_visible, dtype=torch.float64)
    fields = h[n_visible:] + 2.0 * states @ W[:n_visible, n_visible:]
    return torch.logsumexp(states @ h[:n_visible] + F.softplus(fields).sum(-1), 0)


@pytest.mark.parametrize("n,n_visible", [(36, 18), (23, 1), (30, 19)])
def test_rbm_exact_log_partition_in_halves_and_chunks(n, n_visible):
    # 2^18 states span several chunks; a 1-unit side has an empty lower half; a 19/11 split
    # enumerates the second side.
    prior = BoltzmannPrior(n, "rbm", n_visible=n_visible, init_scale=0.4)
    with torch.no_grad():
        prior.h.normal_(0.0, 0.7)
    h, W = prior.h.detach(), prior.coupling_matrix().detach()
    if n_visible > n - n_visible:  # the formula enumerates the first side: swap the sides
        order = torch.cat([torch.arange(n_visible, n), torch.arange(n_visible)])
        h, W, n_visible = h[order], W[order][:, order], n - n_visible
    expected = _summed_out_log_z(h, W, n_visible)
    assert prior.log_partition_exact().item() == pytest.approx(expected.item(), abs=2e-4)


def test_rbm_exact_log_partition_gradient_is_the_exact_moments():
    prior = random_problem(13, "rbm", scale=0.7, seed=5)
    log_z = prior.log_partition_exact()
    grad_h, grad_couplings = torch.autograd.grad(log_z, [prior.h, prior.couplings])
    states, probs = exact_distribution(prior.h.detach(), prior.coupling_matrix().detach())
    assert torch.allclose(grad_h, probs @ states, atol=1e-5)
    # E(z) = -h.z - 2 v'B o: d log Z / d B_ij = 2 E_p[v_i o_j].
    nv = prior.n_visible
    moments = states[:, :nv].T @ (probs[:, None] * states[:, nv:])
    assert torch.allclose(grad_couplings.reshape(nv, -1), 2.0 * moments, atol=1e-5)
