"""Sampling backends against exact enumeration.

Every check has a tolerance derived from the number of effective samples: moments within 5
standard errors (batch means over independent chains when draws of one chain are
correlated), total variation below the bound for that many independent exact samples.
"""

from __future__ import annotations

import math
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import random_problem

from scqbm.prior import boltzmann_energy, enumerate_states, exact_distribution
from scqbm.samplers import (
    CalibratedSampler,
    DimodSampler,
    GibbsSampler,
    ParallelTemperingSampler,
    compare,
    estimate_effective_beta,
    make_sampler,
    to_bqm,
)
from scqbm.samplers import _tempering as tempering

PROBLEMS = [("bm", 12), ("rbm", 14)]


@pytest.fixture
def dwave():
    """The optional dimod backend's samplers; the test is skipped where they are missing."""
    pytest.importorskip("dimod")
    return pytest.importorskip("dwave.samplers")


def problem(structure, n, seed=5, scale=0.5):
    prior = random_problem(n, structure, scale=scale, seed=seed)
    return prior.h.detach(), prior.coupling_matrix().detach(), prior.n_visible


def exact_statistics(h, W, beta=1.0):
    """Exact probabilities of all states and of the statistics z_i and z_i z_j (i < j)."""
    states, probs = exact_distribution(beta * h.double(), beta * W.double())
    return states, probs, probs @ statistics(states)


def statistics(z):
    """Per-sample statistics: the units and the products of pairs, shape (..., n + n(n-1)/2)."""
    rows, cols = torch.triu_indices(z.shape[-1], z.shape[-1], offset=1)
    return torch.cat([z, z[..., rows] * z[..., cols]], dim=-1)


def codes(z):
    return (z.long() * (2 ** torch.arange(z.shape[-1] - 1, -1, -1))).sum(-1)


def check_against_exact(draws, h, W, beta=1.0):
    """Assert that draws ``(T, C, n)`` of ``C`` independent chains match ``exp(-beta E)``.

    ``T = 1``: independent samples, binomial standard errors. ``T > 1``: successive draws of
    each chain are correlated; the standard error of a mean comes from the spread of the ``C``
    per-chain means (batch means with one batch per chain), which accounts for any
    autocorrelation. Returns the effective sample size.
    """
    draws = draws.double()
    T, C, _ = draws.shape
    states, probs, exact = exact_statistics(h, W, beta)
    per_draw = statistics(draws)  # (T, C, S)
    mean = per_draw.mean((0, 1))
    iid_se = (exact * (1 - exact) / (T * C)).sqrt()
    se = iid_se if T == 1 else torch.maximum(per_draw.mean(0).std(0) / math.sqrt(C), iid_se)
    z_scores = (mean - exact).abs() / se
    assert z_scores.max() < 5, f"moment off by {z_scores.max():.1f} standard errors"
    n_eff = float((exact * (1 - exact) / se**2).min())
    # TV of n_eff exact samples: E[TV] <= 0.5 sum_s sqrt(p_s (1 - p_s) / N) (Jensen), and TV
    # exceeds its mean by t with probability <= exp(-2 N t^2) (McDiarmid); here 1e-6.
    counts = torch.bincount(codes(draws.reshape(T * C, -1)), minlength=2 ** draws.shape[-1])
    empirical = counts.double()[codes(states)] / (T * C)
    tv = 0.5 * (empirical - probs).abs().sum().item()
    bound = 0.5 * (probs * (1 - probs) / n_eff).sqrt().sum().item()
    bound += math.sqrt(math.log(1e6) / (2 * n_eff))
    assert tv < bound, f"TV {tv:.3f} above the bound {bound:.3f} for {n_eff:.0f} samples"
    return n_eff


def persistent_draws(sampler, h, W, n_visible, calls):
    reads = sampler.num_chains
    return torch.stack(
        [sampler.sample(h, W, reads, n_visible=n_visible).samples for _ in range(calls)]
    )


# ----------------------------------------------------------------------------- Gibbs
@pytest.mark.parametrize("structure,n", PROBLEMS)
def test_persistent_gibbs_matches_exact(structure, n):
    # Dense systematic scan for "bm", block updates for "rbm".
    h, W, n_visible = problem(structure, n)
    sampler = GibbsSampler(n, num_chains=1000, num_sweeps=2, burn_in=100, seed=0)
    n_eff = check_against_exact(persistent_draws(sampler, h, W, n_visible, 10), h, W)
    assert n_eff > 2000  # the chains mix: 10 draws of 1000 chains are not one sample each


# ----------------------------------------------------------------- parallel tempering
def test_swap_acceptance_sign():
    # A colder replica holding the higher energy always hands it to the hotter one ...
    assert swap_ok(1.0, 0.5, torch.tensor(3.0), torch.tensor(1.0)) == 1.0
    # ... and takes a higher energy from it with probability exp(-(b_a - b_b) dE).
    assert swap_ok(1.0, 0.5, torch.tensor(1.0), torch.tensor(3.0)) == pytest.approx(math.exp(-1))


def swap_ok(beta_a, beta_b, energy_a, energy_b):
    return min(1.0, math.exp(tempering.swap_log_acceptance(beta_a, beta_b, energy_a, energy_b)))


def exact_replicas(h, W, betas, n_chains, generator):
    """Independent exact samples at every inverse temperature, shape (n_temps, n_chains, n)."""
    replicas = []
    for beta in betas.tolist():
        states, probs = exact_distribution(beta * h, beta * W)
        replicas.append(states[torch.multinomial(probs, n_chains, True, generator=generator)])
    return torch.stack(replicas)


def swapped_energy_z_scores(h, W, betas, generator):
    z = exact_replicas(h, W, betas, 20000, generator)
    for parity in (0, 1, 0):
        z, _, _ = tempering.swap_neighbours(z, boltzmann_energy(z, h, W), betas, parity, generator)
    scores = []
    for k, beta in enumerate(betas.tolist()):
        states, probs = exact_distribution(beta * h, beta * W)
        energies = boltzmann_energy(states, h, W)
        mean, var = probs @ energies, probs @ energies**2 - (probs @ energies) ** 2
        observed = boltzmann_energy(z[k], h, W).mean()
        scores.append(((observed - mean) / (var / z.shape[1]).sqrt()).abs().item())
    return max(scores)


def test_swap_moves_preserve_the_tempered_distributions(monkeypatch):
    # Replica exchange must leave the product of exp(-beta_k E) invariant: starting from exact
    # samples at every temperature, swaps alone keep each temperature's energy distribution.
    h, W, _ = problem("bm", 8)
    h, W = h.double(), W.double()
    betas = torch.tensor([1.0, 0.6, 0.35], dtype=torch.float64)
    generator = torch.Generator().manual_seed(0)
    assert swapped_energy_z_scores(h, W, betas, generator) < 5
    # The check has power: the opposite sign (accepting moves that send high energies to
    # cold replicas) is detected.
    monkeypatch.setattr(
        tempering, "swap_log_acceptance", lambda ba, bb, ea, eb: (ba - bb) * (eb - ea)
    )
    assert swapped_energy_z_scores(h, W, betas, generator) > 10


@pytest.mark.parametrize("structure,n", PROBLEMS)
def test_parallel_tempering_matches_exact_at_every_temperature(structure, n):
    h, W, n_visible = problem(structure, n)
    sampler = ParallelTemperingSampler(
        n, num_chains=500, num_temps=4, beta_min=0.3, num_sweeps=2, burn_in=100, seed=0
    )
    draws = persistent_draws(sampler, h, W, n_visible, 10)
    check_against_exact(draws, h, W)
    # Every replica of the final state is an independent sample at its own temperature.
    for k, beta in enumerate(sampler.betas.tolist()):
        check_against_exact(sampler.state[k].unsqueeze(0), h, W, beta)
    info = sampler.sample(h, W, 500, n_visible=n_visible).info
    assert info["persistent"] and len(info["swap_acceptance"]) == 3
    assert info["spin_updates"] == 2 * 4 * 500 * n


def bimodal_problem(n=10, coupling=1.0, odds=3.0):
    """Ferromagnet with modes all-0 and all-1 (odds 1:3) behind a barrier of ~n^2/4."""
    log_odds = math.log(odds)
    W = coupling * (torch.ones(n, n) - torch.eye(n))
    h = torch.full((n,), -coupling * (n - 1) + log_odds / n)
    return h, W


def test_parallel_tempering_crosses_barriers_that_trap_gibbs():
    h, W = bimodal_problem()
    _, probs = exact_distribution(h.double(), W.double())
    p_ones = probs[-1].item()
    assert 0.74 < p_ones < 0.76  # the two modes carry almost all the mass
    n_chains = 2000
    se = math.sqrt(p_ones * (1 - p_ones) / n_chains)
    pt = ParallelTemperingSampler(
        10, num_chains=n_chains, num_temps=10, beta_min=0.03, burn_in=200, seed=0
    )
    frac_pt = (pt.sample(h, W, n_chains).samples.sum(-1) == 10).double().mean().item()
    assert abs(frac_pt - p_ones) < 5 * se
    info = pt.sample(h, W, n_chains).info
    assert all(rate > 0.05 for rate in info["swap_acceptance"] if not math.isnan(rate))
    gibbs = GibbsSampler(10, num_chains=n_chains, burn_in=200, seed=0)
    frac_gibbs = (gibbs.sample(h, W, n_chains).samples.sum(-1) == 10).double().mean().item()
    # Gibbs chains stay in the basin they start in (about half each).
    assert abs(frac_gibbs - p_ones) > 10 * se


def test_parallel_tempering_state_round_trip_and_validation():
    h, W, n_visible = problem("rbm", 6)
    sampler = make_sampler("parallel_tempering", 6, num_chains=16, betas=[0.5, 1.0, 0.25])
    assert sampler.betas.tolist() == [1.0, 0.5, 0.25]
    first = sampler.sample(h, W, 16, n_visible=n_visible)
    assert torch.equal(first.samples, sampler.state[0])
    restored = ParallelTemperingSampler(6, num_chains=16, betas=[1.0, 0.5, 0.25])
    restored.load_state_dict(sampler.state_dict(), strict=True)
    assert torch.equal(restored.state, sampler.state) and bool(restored.initialized)
    fresh = sampler.sample(h.double(), W.double(), 7, n_visible=n_visible)
    assert fresh.samples.shape == (7, 6) and fresh.samples.dtype == torch.float64
    assert not fresh.info["persistent"]
    with pytest.raises(ValueError, match="including the target"):
        ParallelTemperingSampler(6, betas=[0.9, 0.5])
    with pytest.raises(ValueError, match="beta_min"):
        ParallelTemperingSampler(6, beta_min=1.5)


# ----------------------------------------------------------------------------- dimod
@pytest.mark.parametrize("structure", ["bm", "rbm"])
def test_bqm_has_the_model_energy(dwave, structure):
    h, W, _ = problem(structure, 8, seed=2)
    bqm = to_bqm(h, W)
    states = enumerate_states(8, dtype=torch.float64)
    energies = bqm.energies((states.numpy().astype(np.int8), list(range(8))))
    assert np.allclose(energies, boltzmann_energy(states, h.double(), W.double()).numpy())
    if structure == "rbm":  # zero couplings are not interactions: an RBM stays sparse
        assert bqm.num_interactions == 4 * 4


def test_dimod_samples_come_back_in_the_model_variable_order(dwave):
    import dimod

    class ReversedGroundState(dimod.Sampler):
        """Returns the ground state with variables listed in reverse order."""

        parameters: dict = {}  # noqa: RUF012
        properties: dict = {}  # noqa: RUF012

        def sample(self, bqm, num_reads=1):
            best = dimod.ExactSolver().sample(bqm).first
            labels = list(reversed(list(bqm.variables)))
            rows = [[best.sample[v] for v in labels]] * num_reads
            return dimod.SampleSet.from_samples(
                (rows, labels), dimod.BINARY, [best.energy] * num_reads
            )

    h, W, _ = problem("bm", 9, seed=3)
    states = enumerate_states(9)
    ground = states[boltzmann_energy(states, h, W).argmin()]
    samples = DimodSampler(9, ReversedGroundState()).sample(h, W, 3).samples
    assert not torch.equal(ground, ground.flip(0))
    assert torch.equal(samples, ground.expand(3, -1))


@pytest.mark.parametrize("structure,n", PROBLEMS)
def test_tree_decomposition_samples_are_exact(dwave, structure, n):
    h, W, n_visible = problem(structure, n)
    sampler = make_sampler("dimod", n, sampler="tree_decomposition", seed=0, marginals=False)
    check_against_exact(sampler.sample(h, W, 20000, n_visible=n_visible).samples[None], h, W)


def test_raw_simulated_annealing_is_not_a_boltzmann_sampler(dwave):
    # dwave-samplers picks a schedule ending far colder than beta = 1: an optimiser.
    h, W, _ = problem("bm", 12)
    samples = DimodSampler(12, seed=0, num_sweeps=200).sample(h, W, 2000).samples
    states, probs, _ = exact_statistics(h, W)
    energies = boltzmann_energy(states, h.double(), W.double())
    mean, var = probs @ energies, probs @ energies**2 - (probs @ energies) ** 2
    observed = boltzmann_energy(samples.double(), h.double(), W.double()).mean()
    assert observed < mean - 5 * (var / 2000).sqrt()
    assert estimate_effective_beta(samples, h, W) > 2.0


def test_dimod_sampler_options_are_checked(dwave):
    h, W, _ = problem("bm", 4)
    with pytest.raises(ValueError, match="Unknown dimod sampler"):
        DimodSampler(4, "quantum_magic")
    # The reads per training step are declared (properties), not a pass-through keyword.
    assert DimodSampler(4, num_reads=3).properties == {"persistent": False, "num_reads": 3}
    with pytest.raises(TypeError, match="does not accept"):
        DimodSampler(4, num_sweep=10).sample(h, W, 2)
    sampler = DimodSampler(4, seed=1, num_sweeps=10)
    first = sampler.sample(h, W, 3)
    assert first.info["spin_updates"] == 10 * 3 * 4 and first.info["backend"]
    # Picklable after use (the model stores and copies its sampler).
    clone = pickle.loads(pickle.dumps(sampler))
    assert clone.sample(h, W, 3).samples.shape == (3, 4)


def test_missing_dimod_gives_the_install_hint(monkeypatch):
    h, W, _ = problem("bm", 4)
    for module in ("dimod", "dwave", "dwave.samplers"):
        monkeypatch.setitem(sys.modules, module, None)  # makes `import module` fail
    sampler = make_sampler("dimod", 4)  # constructing needs no optional dependency
    calibrated = make_sampler("calibrated", 4)
    for backend in (sampler, calibrated):
        with pytest.raises(ImportError, match=r"pip install 'scqbm\[dimod\]'"):
            backend.sample(h, W, 2)


def test_missing_httpx_gives_the_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "httpx", None)
    h, W, _ = problem("bm", 4)
    sampler = make_sampler("remote", 4, url="http://127.0.0.1:9")  # constructing is free
    with pytest.raises(ImportError, match=r"pip install 'scqbm\[service\]'"):
        sampler.sample(h, W, 2)


def test_import_scqbm_does_not_import_optional_dependencies():
    # Every optional dependency made unimportable: scqbm, its registry and its command load.
    code = (
        "import sys\n"
        "for m in ('dimod', 'dwave', 'kaiwu', 'fastapi', 'uvicorn', 'httpx'):\n"
        "    sys.modules[m] = None\n"
        "import scqbm.samplers as s\n"
        "names = {'dimod', 'calibrated', 'kaiwu_sa', 'kaiwu_cim', 'remote'}\n"
        "assert names <= set(s.available_samplers())\n"
        "from scqbm.cli import build_parser\n"
        "args = build_parser().parse_args(['serve-sampler', '--backend', 'kaiwu_sa'])\n"
        "assert args.func(args) == 2  # the install hint, not a traceback\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "pip install 'scqbm[service]'" in result.stderr


# ------------------------------------------------------------------------ calibration
@pytest.mark.parametrize("structure,n", PROBLEMS)
def test_effective_beta_of_exact_samples_at_a_known_temperature(dwave, structure, n):
    h, W, n_visible = problem(structure, n)
    beta, reads = 2.5, 20000
    sampler = DimodSampler(n, "tree_decomposition", seed=1, beta=beta, marginals=False)
    samples = sampler.sample(h, W, reads, n_visible=n_visible).samples
    states, probs = exact_distribution(beta * h.double(), beta * W.double())
    energies = boltzmann_energy(states, h.double(), W.double())
    var = probs @ energies**2 - (probs @ energies) ** 2
    # Energy matching is the maximum-likelihood estimate: standard error 1 / sqrt(N Var E).
    se = 1.0 / math.sqrt(reads * var.item())
    exact = estimate_effective_beta(samples, h, W, n_visible)
    assert abs(exact - beta) < 5 * se
    # Reference Gibbs runs from 4000 of the samples: the energy of 4000 chains has standard
    # error sqrt(Var E / 4000), and in 5 sweeps the runs relax only part of the way towards
    # U(beta), which divides their response to beta; allow 3x the standard error.
    chains = 4000
    gibbs = estimate_effective_beta(
        samples, h, W, n_visible, exact=False, max_reference_chains=chains
    )
    assert abs(gibbs - beta) < 15 / math.sqrt(chains * var.item())
    # Pseudo-likelihood is consistent too (less efficient than maximum likelihood).
    pseudo = estimate_effective_beta(samples, h, W, n_visible, method="pseudolikelihood")
    assert abs(pseudo - beta) < 15 * se


def test_calibration_recovers_a_known_backend_temperature(dwave):
    h, W, n_visible = problem("rbm", 14)
    sampler = CalibratedSampler(
        DimodSampler(14, "tree_decomposition", seed=0, beta=2.5), calibrate_every=3
    )
    result = sampler.sample(h, W, 20000, n_visible=n_visible)
    assert result.info["calibration_converged"]
    assert result.info["effective_beta"] == pytest.approx(2.5, rel=0.05)
    check_against_exact(result.samples[None], h, W)
    # Between calibrations the stored scale is used; the call counter is a buffer.
    again = sampler.sample(h, W, 100, n_visible=n_visible)
    assert "target_beta" not in again.info
    assert again.info["effective_beta"] == pytest.approx(result.info["effective_beta"], rel=0.05)
    restored = CalibratedSampler(DimodSampler(14, "tree_decomposition"))
    restored.load_state_dict(sampler.state_dict(), strict=True)
    assert float(restored.scale) == float(sampler.scale) and int(restored.calls) == 2


def test_calibration_keeps_its_scale_on_an_uninformative_prior(dwave):
    # All energies equal (the flat prior at the start of training): any beta fits, and the
    # estimator returns a bound (0.01). Rescaling by it would send a problem 100x too large.
    h, W = torch.zeros(6), torch.zeros(6, 6)
    assert estimate_effective_beta(torch.ones(50, 6), h, W) == pytest.approx(0.01, rel=1e-3)
    sampler = CalibratedSampler(DimodSampler(6, "tree_decomposition", seed=0))
    result = sampler.sample(h, W, 500)
    assert not result.info["calibration_informative"] and not result.info["calibration_converged"]
    assert float(sampler.scale) == 1.0 and result.info["effective_beta"] == 1.0


@pytest.mark.parametrize("structure,n", PROBLEMS)
def test_calibrated_simulated_annealing_matches_exact(dwave, structure, n):
    # With a fixed schedule ending at beta = 2, simulated annealing equilibrates near its
    # final temperature; dividing the problem by the estimated beta makes it a sampler of the
    # model.
    h, W, n_visible = problem(structure, n)
    sampler = make_sampler(
        "calibrated",
        n,
        backend_kwargs={
            "sampler": "simulated_annealing",
            "seed": 0,
            "num_sweeps": 300,
            "beta_range": (0.1, 2.0),
        },
    )
    result = sampler.sample(h, W, 10000, n_visible=n_visible)
    assert result.info["calibration_converged"]
    check_against_exact(result.samples[None], h, W)


def test_calibration_warns_when_the_backend_schedule_scales_with_the_problem(dwave):
    h, W, _ = problem("bm", 10)
    sampler = CalibratedSampler(DimodSampler(10, seed=0, num_sweeps=50), max_iter=3)
    with pytest.warns(RuntimeWarning, match="scales with the problem"):
        result = sampler.sample(h, W, 500)
    assert not result.info["calibration_converged"]


# --------------------------------------------------------------------------- compare
def test_compare_ranks_backends_by_distance_to_exact(dwave):
    h, W, _ = problem("bm", 10)
    table = compare(
        {
            "gibbs": GibbsSampler(10, persistent=False, burn_in=100, seed=0),
            "annealer": DimodSampler(10, seed=0, num_sweeps=100),
        },
        h,
        W,
        num_reads=4000,
    )
    assert list(table.index) == ["gibbs", "annealer"] and (table["reference"] == "exact").all()
    gibbs, annealer = table.loc["gibbs"], table.loc["annealer"]
    assert gibbs["tv"] < 2 * gibbs["tv_floor"] < annealer["tv"]
    assert gibbs["max_marginal_error"] < annealer["max_marginal_error"]
    assert gibbs["spin_updates_per_s"] > 0 and annealer["samples_per_s"] > 0
    assert annealer["mean_energy_error"] < 0  # too cold


def test_compare_against_reference_samples():
    h, W, n_visible = problem("rbm", 24)
    reference = (
        GibbsSampler(24, persistent=False, burn_in=300, seed=1)
        .sample(h, W, 4000, n_visible=n_visible)
        .samples
    )
    table = compare(
        {"gibbs": GibbsSampler(24, persistent=False, burn_in=300, seed=2)},
        h,
        W,
        4000,
        n_visible,
        reference=reference,
    )
    row = table.loc["gibbs"]
    assert row["reference"] == "samples" and math.isnan(row["tv"])
    # Two independent sets of 4000 samples: marginal differences of a few 0.01 at most.
    assert row["max_marginal_error"] < 5 * math.sqrt(2 * 0.25 / 4000)
