"""Samplers declare what they do (``parameters``, ``properties``), and training believes them.

Every registered backend, wrapped or not, runs a short real training: each step draws the
declared number of reads, and a backend that claims persistent chains continues the same
chains from step to step.
"""

from __future__ import annotations

import itertools
import logging
import sys

import pytest
import scvi
import torch
from test_kaiwu import SDK_CODE_ENV, USER_ID_ENV, FakeKaiwu

from scqbm import QBMVAE
from scqbm.samplers import (
    BoltzmannSampler,
    CalibratedSampler,
    GibbsSampler,
    KaiwuCredentialsError,
    PersistentChainSampler,
    SamplerError,
    SamplerNotInstalled,
    SamplerUnavailable,
    available_samplers,
    make_sampler,
    validate_problem,
)


def have_dimod() -> bool:
    try:
        import dimod  # noqa: F401
        import dwave.samplers  # noqa: F401
    except ImportError:
        return False
    return True


DIMOD = {"sampler": "tree_decomposition", "seed": 0, "num_reads": 16}
# name, sampler_kwargs, claims persistence, needs
BACKENDS = [
    ("gibbs", {"num_chains": 16, "seed": 0}, True, None),
    ("parallel_tempering", {"num_chains": 16, "num_temps": 3, "seed": 0}, True, None),
    # The reproduced bug: this drew 512 fresh chains for 101 sweeps at every step.
    ("calibrated", {"backend": "gibbs", "backend_kwargs": {"num_chains": 64}}, True, None),
    ("dimod", DIMOD, False, "dimod"),
    ("calibrated", {"backend": "dimod", "backend_kwargs": DIMOD}, False, "dimod"),
    ("kaiwu_sa", {"num_reads": 16, "seed": 0, "reads_per_solve": 16}, False, "kaiwu"),
    ("kaiwu_cim", {"num_reads": 16}, False, "kaiwu"),
]


def provide(needs: str | None, monkeypatch) -> None:
    """What a backend of ``BACKENDS`` needs: skip without dimod, the stand-in kaiwu SDK."""
    if needs == "dimod" and not have_dimod():
        pytest.skip("dimod and dwave-samplers are not installed")
    if needs == "kaiwu":
        monkeypatch.setitem(sys.modules, "kaiwu", FakeKaiwu())
        monkeypatch.setenv(USER_ID_ENV, "user")
        monkeypatch.setenv(SDK_CODE_ENV, "code")


@pytest.fixture
def adata():
    scvi.settings.seed = 0
    return scvi.data.synthetic_iid(batch_size=75, n_genes=20, n_batches=2, n_labels=2)


def chain_owner(sampler: BoltzmannSampler) -> PersistentChainSampler | None:
    while isinstance(sampler, CalibratedSampler):
        sampler = sampler.backend
    return sampler if isinstance(sampler, PersistentChainSampler) else None


def test_every_registered_backend_is_covered():
    covered = {name for name, *_ in BACKENDS} | {"remote"}  # remote: the service's tests
    # Other test modules register failing stand-ins in the same process; they are no backend.
    shipped = {name for name in available_samplers() if not name.startswith("failing")}
    assert shipped <= covered


@pytest.mark.parametrize(
    "name,kwargs,persistent,needs", BACKENDS, ids=[f"{b[0]}-{i}" for i, b in enumerate(BACKENDS)]
)
def test_training_draws_the_declared_reads_and_keeps_claimed_chains(
    adata, monkeypatch, tmp_path, name, kwargs, persistent, needs
):
    provide(needs, monkeypatch)
    if name == "kaiwu_cim":
        kwargs = {**kwargs, "checkpoint_dir": str(tmp_path)}
    QBMVAE.setup_anndata(adata, batch_key="batch")
    model = QBMVAE(
        adata, n_latent=6, n_hidden=16, prior="rbm", sampler=name, sampler_kwargs=kwargs
    )
    module = model.module
    declared = module.sampler.properties
    assert declared["persistent"] is persistent
    assert declared["num_reads"] == module.num_negative_samples
    assert declared["num_reads"] == (64 if "backend_kwargs" in kwargs and persistent else 16)
    owner = chain_owner(module.sampler)
    assert (owner is not None) is persistent

    records = []
    original = module.sample_negative_phase

    def recording():
        before = None if owner is None else owner.state.clone()
        result = original()
        records.append((before, result))
        return result

    monkeypatch.setattr(module, "sample_negative_phase", recording)
    model.train(max_epochs=1, batch_size=50, train_size=1.0, enable_progress_bar=False)
    assert len(records) == 3  # 150 cells, batches of 50
    for _, result in records:
        assert result.samples.shape == (declared["num_reads"], 6)
        assert result.info.get("persistent", False) is persistent
    if persistent:
        # Each step starts where the previous one ended: the same chains, continued.
        for (_, previous), (before, _) in itertools.pairwise(records):
            state = before[0] if before.dim() == 3 else before
            assert torch.equal(state, previous.samples)
        assert bool(owner.initialized)


def test_non_persistent_training_warns_once(adata, caplog):
    QBMVAE.setup_anndata(adata, batch_key="batch")
    model = QBMVAE(
        adata, n_latent=4, n_hidden=8, sampler_kwargs={"num_chains": 8, "persistent": False}
    )
    with caplog.at_level(logging.WARNING, logger="scqbm.train._plan"):
        model.train(max_epochs=2, batch_size=50, enable_progress_bar=False)
    assert sum("keeps no chains" in r.getMessage() for r in caplog.records) == 1


def test_unknown_keywords_are_rejected_naming_the_accepted_ones():
    with pytest.raises(TypeError, match=r"\['num_chain'\].*accepted: .*'num_chains'"):
        make_sampler("gibbs", 4, num_chain=8)
    with pytest.raises(TypeError, match=r"CalibratedSampler does not accept \['tolerance'\]"):
        make_sampler("calibrated", 4, backend="gibbs", tolerance=0.1)
    sampler = make_sampler("gibbs", 4, num_chains=8)
    h, W = torch.zeros(4), torch.zeros(4, 4)
    with pytest.raises(TypeError, match=r"does not accept \['sweeps'\]; accepted: "):
        sampler.sample(h, W, 8, sweeps=3)
    assert set(sampler.parameters) == {"num_reads", "n_visible"}
    assert sampler.properties == {"persistent": True, "num_reads": 8}


def test_calibrated_sampler_wraps_an_instance_and_forwards_its_properties():
    child = GibbsSampler(6, num_chains=24)
    wrapped = CalibratedSampler(child)
    assert wrapped.backend is child
    assert wrapped.properties["persistent"] and wrapped.properties["num_reads"] == 24
    with pytest.raises(TypeError, match="sampler instance"):
        CalibratedSampler("gibbs")
    with pytest.raises(ValueError, match="cannot wrap another calibrated"):
        CalibratedSampler(wrapped)


def test_num_negative_samples_follows_or_fills_in_the_declaration(adata):
    QBMVAE.setup_anndata(adata, batch_key="batch")
    with pytest.raises(ValueError, match=r"contradicts sampler 'gibbs'.*32 reads"):
        QBMVAE(adata, n_latent=4, sampler_kwargs={"num_chains": 32}, num_negative_samples=16)
    model = QBMVAE(adata, n_latent=4, sampler_kwargs={"num_chains": 32})
    assert model.module.num_negative_samples == 32


def test_error_hierarchy():
    assert issubclass(SamplerUnavailable, SamplerError)
    assert issubclass(KaiwuCredentialsError, SamplerUnavailable)
    assert issubclass(SamplerNotInstalled, SamplerUnavailable)
    assert issubclass(SamplerNotInstalled, ImportError)
    from scqbm.samplers import KaiwuError

    assert issubclass(KaiwuError, SamplerError)


def test_validate_problem_checks_the_bipartite_structure():
    W = torch.zeros(4, 4)
    W[0, 1] = W[1, 0] = 0.5  # within the first side of a 2/2 split
    with pytest.raises(ValueError, match="not a bipartite"):
        validate_problem(torch.zeros(4), W, n_visible=2)
    validate_problem(torch.zeros(4), W)  # fine as a dense problem
    with pytest.raises(ValueError, match="between 1 and 3"):
        validate_problem(torch.zeros(4), torch.zeros(4, 4), n_visible=4)
    with pytest.raises(ValueError, match="not a bipartite"):
        GibbsSampler(4, num_chains=2).sample(torch.zeros(4), W, 2, n_visible=2)


SEEDED = [(name, kwargs, needs) for name, kwargs, _, needs in BACKENDS if name != "kaiwu_cim"]


@pytest.mark.parametrize(
    "name,kwargs,needs", SEEDED, ids=[f"{b[0]}-{i}" for i, b in enumerate(SEEDED)]
)
def test_restoring_state_dict_and_random_state_replays_the_same_draws(
    monkeypatch, name, kwargs, needs
):
    # What a failed train() puts back (the chains in the state_dict, the generator or seed
    # stream in random_state) must be all a seeded backend needs to draw the same again.
    provide(needs, monkeypatch)
    if name == "calibrated":
        kwargs = {**kwargs, "backend_kwargs": {**kwargs["backend_kwargs"], "seed": 4}}
    sampler = make_sampler(name, 6, **kwargs)
    generator = torch.Generator().manual_seed(1)
    h = torch.randn(6, generator=generator)
    W = torch.randn(6, 6, generator=generator).triu(1)
    W = W + W.T
    reads = sampler.properties["num_reads"] or 16
    sampler.sample(h, W, reads)  # burn-in, generators created
    chains = {k: v.clone() for k, v in sampler.state_dict().items()}
    state = sampler.random_state()
    first = [sampler.sample(h, W, reads).samples for _ in range(2)]
    sampler.load_state_dict(chains)
    sampler.set_random_state(state)
    again = [sampler.sample(h, W, reads).samples for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    # ... and without the restore the stream moves on (the draws are not a constant).
    later = sampler.sample(h, W, reads).samples
    assert not all(torch.equal(later, a) for a in first)
