"""The prior owns log Z: refreshes, the drift rule, the factorial ablation, saving and loading."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import scvi
import torch
from conftest import random_problem

from scqbm import QBMVAE
from scqbm.prior import (
    LOG_Z_TOLERANCE,
    BoltzmannPrior,
    enumerate_states,
    exact_distribution,
    exact_log_partition,
)


@pytest.fixture
def adata():
    scvi.settings.seed = 0
    return scvi.data.synthetic_iid(batch_size=75, n_genes=20, n_batches=2, n_labels=2)


def brute_force_log_z(prior: BoltzmannPrior) -> float:
    states = enumerate_states(prior.n_units, dtype=torch.float64)
    h, W = prior.h.detach().double(), prior.coupling_matrix().detach().double()
    return torch.logsumexp(states @ h + ((states @ W) * states).sum(-1), 0).item()


# ------------------------------------------------------------------------- factorial
def test_factorial_prior_has_fields_only_and_closed_form_log_z():
    prior = BoltzmannPrior(8, "factorial")
    assert [name for name, _ in prior.named_parameters()] == ["h"]
    with torch.no_grad():
        prior.h.normal_(0.0, 1.5, generator=torch.Generator().manual_seed(0))
    assert torch.count_nonzero(prior.coupling_matrix()) == 0
    assert prior.exact and not prior.needs_negative_phase
    assert prior.log_partition_exact().item() == pytest.approx(brute_force_log_z(prior), abs=1e-5)
    assert prior.refresh().method == "exact"
    assert prior.log_z.item() == pytest.approx(brute_force_log_z(prior), abs=1e-5)


def test_factorial_kl_and_its_gradients_are_exact():
    prior = BoltzmannPrior(6, "factorial")
    with torch.no_grad():
        prior.h.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(1))
    logits = torch.randn(4, 6, generator=torch.Generator().manual_seed(2))
    # Brute force over all 2**6 states of q and p.
    states = enumerate_states(6, dtype=torch.float64)
    h = prior.h.detach().double().requires_grad_()
    log_p = states @ h - torch.logsumexp(states @ h, 0)
    log_q = torch.distributions.Bernoulli(logits=logits.double()[:, None]).log_prob(states).sum(-1)
    exact = (log_q.exp() * (log_q - log_p)).sum(-1)
    ours = prior.kl(logits)
    assert torch.allclose(ours.double(), exact, atol=1e-5)
    (grad_exact,) = torch.autograd.grad(exact.sum(), h)
    (grad_ours,) = torch.autograd.grad(ours.sum(), prior.h)
    assert torch.allclose(grad_ours.double(), grad_exact, atol=1e-5)


def test_factorial_samples_are_exact_independent_draws():
    prior = BoltzmannPrior(5, "factorial")
    with torch.no_grad():
        prior.h.copy_(torch.tensor([-2.0, -0.5, 0.0, 1.0, 3.0]))
    n = 40_000
    samples = prior.sample(n, seed=0)
    p = torch.sigmoid(prior.h.detach())
    se = (p * (1 - p) / n).sqrt()
    assert torch.all((samples.mean(0) - p).abs() < 5 * se)
    # Independent: the empirical covariance of two units is within noise of zero.
    cov = (samples[:, 0] * samples[:, 4]).mean() - samples[:, 0].mean() * samples[:, 4].mean()
    assert abs(cov.item()) < 5 * math.sqrt(p[0] * p[4] / n)


def test_factorial_ablation_trains_without_a_negative_phase(adata):
    QBMVAE.setup_anndata(adata, batch_key="batch")
    model = QBMVAE(adata, n_latent=6, n_hidden=16, prior="factorial")
    assert not any("couplings" in key for key in model.module.state_dict())
    model.train(max_epochs=2, batch_size=50, enable_progress_bar=False)
    assert (model.history["sampler_seconds"].to_numpy(dtype=float) == 0).all()
    estimate = model.get_log_partition()
    exact = torch.nn.functional.softplus(model.module.prior.h).sum().item()
    assert estimate.method == "exact" and estimate.value == pytest.approx(exact, abs=1e-5)
    assert model.sample_prior(7, burn_in=0).shape == (7, 6)


# ------------------------------------------------------------------------ drift rule
@pytest.mark.parametrize("structure", ["bm", "rbm"])
def test_drift_bound_holds_for_random_moves(structure):
    prior = random_problem(10, structure, scale=0.5, seed=3)
    generator = torch.Generator().manual_seed(4)
    for _ in range(10):
        before = prior.refresh().value
        assert prior.log_z_drift() == 0.0
        with torch.no_grad():
            prior.h.add_(0.3 * torch.randn(10, generator=generator))
            prior.couplings.add_(0.3 * torch.randn(prior.couplings.shape, generator=generator))
        after = exact_log_partition(prior.h, prior.coupling_matrix(), prior.n_visible).item()
        assert abs(after - before) <= prior.log_z_drift() + 1e-5


@pytest.mark.parametrize("structure", ["bm", "rbm"])
def test_drift_bound_is_the_larger_one_sided_sum_and_can_be_attained(structure):
    prior = random_problem(8, structure, scale=0.5, seed=1)
    prior.refresh()
    dh = torch.tensor([0.2, -0.1, 0.05, -0.3, 0.0, 0.1, -0.05, 0.2])
    dc = 0.01 * torch.randn(prior.couplings.shape, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        prior.h.add_(dh)
        prior.couplings.add_(dc)
    coefficients = torch.cat([dh, 2.0 * dc.reshape(-1)])
    up, down = coefficients.clamp(min=0).sum(), -coefficients.clamp(max=0).sum()
    assert prior.log_z_drift() == pytest.approx(float(max(up, down)), abs=1e-6)
    assert prior.log_z_drift() < float(coefficients.abs().sum())
    # Attained in the limit where the reference puts all its mass on the all-ones state and
    # every coefficient grows: log Z then moves by the whole positive sum.
    sharp = BoltzmannPrior(6, structure=structure, init_scale=0.0)
    with torch.no_grad():
        sharp.h.fill_(30.0)
    sharp.refresh()
    with torch.no_grad():
        sharp.h.add_(0.1)
        sharp.couplings.add_(0.05)
    moved = exact_log_partition(sharp.h, sharp.coupling_matrix(), sharp.n_visible).item()
    assert moved - float(sharp.log_z) == pytest.approx(sharp.log_z_drift(), rel=1e-4)


def _exact_samples(prior: BoltzmannPrior, n: int, generator: torch.Generator) -> torch.Tensor:
    states, probs = exact_distribution(prior.h.detach(), prior.coupling_matrix().detach())
    return states[torch.multinomial(probs, n, replacement=True, generator=generator)]


@pytest.mark.parametrize("structure", ["bm", "rbm"])
def test_importance_sampling_updates_of_log_z_track_the_exact_value(structure):
    """``log_z_ratio`` against brute force: each update within its standard error, and a
    chain of updates keeps the stored value within the accumulated error of exact log Z."""
    torch.manual_seed(5)
    prior = BoltzmannPrior(10, structure=structure, init_scale=0.3, log_partition="ais")
    with torch.no_grad():
        prior.h.normal_(0.0, 0.5)
    prior.refresh()
    with torch.no_grad():  # start from the exact value: only the updates' error remains
        prior.log_z.fill_(brute_force_log_z(prior))
        prior.log_z_stderr.fill_(0.0)
    generator = torch.Generator().manual_seed(6)
    for _ in range(10):
        before = brute_force_log_z(prior)
        with torch.no_grad():
            prior.h.add_(0.1 * torch.randn(10, generator=generator))
            prior.couplings.add_(0.1 * torch.randn(prior.couplings.shape, generator=generator))
        after = brute_force_log_z(prior)
        ratio = prior.log_z_ratio(_exact_samples(prior, 4096, generator))
        assert ratio is not None and 0 < ratio.stderr < 0.05
        assert abs(ratio.value - (before - after)) <= 4 * ratio.stderr + 1e-4
        prior.apply_log_z_ratio(ratio)
        assert prior.log_z_drift() == 0.0  # the current parameters are the reference now
    assert prior.log_z_updates == 10
    assert abs(float(prior.log_z) - after) <= 4 * float(prior.log_z_stderr)
    prior.refresh()
    assert prior.log_z_updates == 0


def test_importance_sampling_update_refuses_where_it_cannot_be_trusted():
    generator = torch.Generator().manual_seed(7)
    prior = BoltzmannPrior(10, structure="bm", init_scale=0.3, log_partition="ais")
    stale = _exact_samples(prior, 512, generator)
    assert prior.log_z_ratio(stale) is None  # no stored estimate yet
    prior.refresh()
    with torch.no_grad():  # a far move: samples of the old prior carry little weight
        prior.h.add_(3.0 * torch.randn(10, generator=generator))
    assert prior.log_z_ratio(stale) is None
    exact = BoltzmannPrior(10, structure="bm", init_scale=0.3)
    exact.refresh()
    assert exact.log_z_ratio(_exact_samples(exact, 512, generator)) is None  # exact stays exact


@pytest.mark.parametrize(
    ("method", "max_updates"), [("exact", 10), ("ais", 0), ("ais", 10)], ids=str
)
def test_logged_log_z_follows_a_fast_moving_prior(adata, monkeypatch, method, max_updates):
    """Dense prior, lr 1e-2 (1e-1 for the prior) on a tiny dataset.

    At every training step the log Z the ELBO uses stays within the tolerance (guaranteed by
    the bound for exact log Z) of the exact value, whether an AIS log Z is refreshed by AIS
    runs only (``max_updates=0``) or mostly by importance-sampling updates.
    """
    QBMVAE.setup_anndata(adata, batch_key="batch")
    model = QBMVAE(
        adata, n_latent=16, n_hidden=16, prior="bm", log_partition=method,
        ais_kwargs={"n_chains": 128, "n_betas": 200},
    )  # fmt: skip
    prior = model.module.prior
    gaps, stderrs, exacts = [], [], []
    kl = prior.kl

    def recording_kl(logits, negative_samples=None):
        out = kl(logits, negative_samples)
        if model.module.training:
            with torch.no_grad():
                exacts.append(prior.log_partition_exact().item())
                gaps.append(abs(prior.log_z.item() - exacts[-1]))
                stderrs.append(prior.log_z_stderr.item())
        return out

    monkeypatch.setattr(prior, "kl", recording_kl)
    model.train(
        max_epochs=4, batch_size=10, train_size=1.0, enable_progress_bar=False,
        plan_kwargs={
            "lr": 1e-2, "lr_prior": 1e-1, "n_epochs_kl_warmup": None,
            "log_z_max_updates": max_updates, "log_z_refresh_budget": None,
        },
    )  # fmt: skip
    refreshes = model.history["log_z_refreshes"].to_numpy(dtype=float).sum()
    updates = model.history["log_z_updates"].to_numpy(dtype=float).sum()
    print(
        f"{method}/{max_updates}: max gap {max(gaps):.3f}, log Z range "
        f"{max(exacts) - min(exacts):.2f}, {refreshes:.0f} refreshes, {updates:.0f} updates"
    )
    assert len(gaps) == 60
    assert 1 < refreshes + updates <= 60  # it does refresh, and at most once per step
    if method == "exact" or max_updates == 0:
        assert updates == 0  # exact log Z is never updated by importance sampling
    else:
        # Some refreshes became updates; at lr_prior 0.1 many fail the effective-sample-size
        # check (the chains lag such a fast prior) and stay AIS runs.
        assert updates > 0
    # The prior did move by more than the tolerance: the rule, not stillness, kept it close.
    assert max(exacts) - min(exacts) > 4 * LOG_Z_TOLERANCE
    if method == "exact":
        assert max(gaps) <= LOG_Z_TOLERANCE + 1e-4
    else:
        # The drift estimate plus AIS error: within the 1 nat per cell users ask for.
        assert max(gaps) <= 2 * LOG_Z_TOLERANCE
        assert max(stderrs) < 0.1


def _train_with_budget(adata, budget):
    scvi.settings.seed = 0
    QBMVAE.setup_anndata(adata, batch_key="batch")
    model = QBMVAE(
        adata, n_latent=12, n_hidden=16, prior="bm", log_partition="ais",
        ais_kwargs={"n_chains": 64, "n_betas": 50},
    )  # fmt: skip
    model.train(
        max_epochs=3, batch_size=10, enable_progress_bar=False,
        plan_kwargs={
            "lr": 1e-2, "lr_prior": 1e-1, "n_epochs_kl_warmup": None,
            "log_z_refresh_budget": budget,
        },
    )  # fmt: skip
    return model


def test_refresh_budget_defers_ais_without_changing_training(adata):
    """The budget decides only when log Z is re-estimated, never what training computes.

    A budget of 1e-9 of the training time defers every routine AIS refresh after the first
    estimate; the weights, chains and decoded outputs are bit-identical to those of an
    unlimited run with the same seed, because AIS draws from its own generator.
    """
    free = _train_with_budget(adata, None)
    capped = _train_with_budget(adata, 1e-9)
    free_h, capped_h = free.history, capped.history
    free_refreshes = free_h["log_z_refreshes"].to_numpy(dtype=float).sum()
    capped_refreshes = capped_h["log_z_refreshes"].to_numpy(dtype=float).sum()
    deferred = capped_h["log_z_deferred"].to_numpy(dtype=float)
    assert free_h["log_z_deferred"].to_numpy(dtype=float).sum() == 0
    assert deferred.sum() > 0 and free_refreshes > capped_refreshes
    # Every deferral is accounted for: what was due either ran or was deferred.
    assert capped_refreshes + deferred.sum() >= free_refreshes
    # The logged drift of a deferred estimate exceeds the tolerance (that is why it was due).
    drift = capped_h["log_z_deferred_drift"].to_numpy(dtype=float)
    assert np.nanmax(drift) > LOG_Z_TOLERANCE
    skip = {"prior.log_z", "prior.log_z_stderr"}
    free_state, capped_state = free.module.state_dict(), capped.module.state_dict()
    assert free_state.keys() == capped_state.keys()
    for key in free_state:
        if key not in skip:
            assert torch.equal(free_state[key], capped_state[key]), key
    # The final estimate always runs: both models report a fresh log Z of the same prior.
    free_z, capped_z = free.get_log_partition(), capped.get_log_partition()
    assert abs(free_z.value - capped_z.value) < 4 * math.hypot(free_z.stderr, capped_z.stderr)


def test_refresh_budget_must_be_a_share_of_time(adata):
    QBMVAE.setup_anndata(adata, batch_key="batch")
    model = QBMVAE(adata, n_latent=6, n_hidden=8)
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="log_z_refresh_budget"):
            model.train(max_epochs=1, plan_kwargs={"log_z_refresh_budget": bad})


def test_saturated_latent_warns_once(adata, caplog):
    QBMVAE.setup_anndata(adata, batch_key="batch")
    model = QBMVAE(adata, n_latent=4, n_hidden=8)
    with torch.no_grad():  # logits of magnitude ~1e3: every probability is 0 or 1
        model.module.z_encoder.logit_encoder.weight.mul_(1e4)
        model.module.z_encoder.logit_encoder.bias.fill_(50.0)
    with caplog.at_level(logging.WARNING, logger="scqbm.train._plan"):
        model.train(max_epochs=2, batch_size=50, enable_progress_bar=False, plan_kwargs={"lr": 0})
    messages = [r.getMessage() for r in caplog.records if "saturates" in r.getMessage()]
    assert len(messages) == 1 and "beyond 0.01/0.99" in messages[0]


# --------------------------------------------------------- queries, saving, loading
def test_queries_refresh_log_z_without_breaking_training(adata):
    QBMVAE.setup_anndata(adata, batch_key="batch")
    model = QBMVAE(adata, n_latent=6, n_hidden=16)
    # Computed under inference mode by the prior itself (in place), before any training.
    assert np.isfinite(model.get_log_partition().value)
    model.train(max_epochs=1, batch_size=50, enable_progress_bar=False)
    chains = model.module.sampler.state.clone()
    model.sample_prior(11, burn_in=3, seed=0)
    assert torch.equal(model.module.sampler.state, chains)  # training chains untouched
    fresh = model.get_log_partition("exact")  # under inference mode
    assert model.get_log_partition().value == pytest.approx(fresh.value, abs=1e-4)
    # The states it enumerated (cached) still serve a differentiable log Z afterwards.
    log_z = model.module.prior.log_partition_exact()
    (grad,) = torch.autograd.grad(log_z, model.module.prior.h)
    assert torch.isfinite(grad).all()


def test_save_load_and_old_state_dict_keys(adata, tmp_path):
    QBMVAE.setup_anndata(adata, batch_key="batch")
    model = QBMVAE(adata, n_latent=6, n_hidden=16)
    model.train(max_epochs=1, batch_size=50, enable_progress_bar=False)
    state = model.module.state_dict()
    assert "prior.log_z" in state and "log_z" not in state
    model.save(tmp_path / "m")
    loaded = QBMVAE.load(tmp_path / "m", adata=adata)
    assert loaded.module.prior.log_z.item() == model.module.prior.log_z.item()
    # A state dict of the previous layout (log Z on the module) still loads strictly.
    old = dict(state)
    old["log_z"], old["log_z_stderr"] = old.pop("prior.log_z"), old.pop("prior.log_z_stderr")
    fresh = QBMVAE(adata, n_latent=6, n_hidden=16)
    fresh.module.load_state_dict(old, strict=True)
    assert fresh.module.prior.log_z.item() == model.module.prior.log_z.item()
    # After loading, the drift reference is unknown: training re-estimates first.
    assert loaded.module.prior.log_z_drift() == math.inf
