"""The sampling service believes what samplers declare: properties, cost, preflight, errors.

No signature probing and no ``getattr`` guesses: persistence comes from
``properties["persistent"]``, the price of a read from ``sweeps_per_read``, the startup check
from ``preflight()`` (part of :class:`~scqbm.samplers.BoltzmannSampler`), and backend
failures are mapped by the common roots ``SamplerUnavailable`` / ``SamplerError``.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
from test_samplers_backends import problem

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402

from scqbm.samplers import (  # noqa: E402
    BoltzmannSampler,
    GibbsSampler,
    ParallelTemperingSampler,
    RemoteSampler,
    SamplerError,
    SamplerUnavailable,
    ServiceConfigurationError,
    ServiceUnavailable,
    register_sampler,
)
from scqbm.samplers.service import (  # noqa: E402
    ServiceLimits,
    _app,
    create_app,
    encode_array,
)

TOKEN = "backend-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


class _Declared(BoltzmannSampler):
    """Random bits with a declared cost per read; fails on demand. No `persistent` option."""

    # Names starting with "failing" are test stand-ins, not shipped backends.
    name = "failing_declared"

    def __init__(self, n_units: int, sweeps: int = 1000, fail: str | None = None):
        super().__init__()
        self.n_units, self._sweeps, self.fail = n_units, sweeps, fail

    @property
    def sweeps_per_read(self) -> int:
        return self._sweeps

    def _sample(self, h, W, num_reads, n_visible):
        if self.fail == "unavailable":
            raise SamplerUnavailable("no licence on this host")
        if self.fail == "fault":
            raise SamplerError("the device reported a fault")
        return torch.randint(0, 2, (num_reads, h.shape[0])).to(h.dtype), {}


class _NoLicence(BoltzmannSampler):
    """A backend whose preflight finds it cannot run here."""

    name = "failing_preflight"

    def __init__(self, n_units: int):
        super().__init__()
        self.n_units = n_units

    def preflight(self) -> None:
        raise SamplerUnavailable("failing_preflight has no licence here")

    def _sample(self, h, W, num_reads, n_visible):  # pragma: no cover - never reached
        raise AssertionError("preflight should have stopped the service")


register_sampler(_Declared.name, _Declared)
register_sampler(_NoLicence.name, _NoLicence)


def info_of(backend, kwargs=None, **app_kwargs):
    app = create_app(backend, kwargs, token=TOKEN, **app_kwargs)
    try:
        with TestClient(app) as client:
            return client.get("/v1/info", headers=AUTH).json()
    finally:
        app.state.pool.close()


# ------------------------------------------------------------------ persistence
def test_persistence_comes_from_the_declared_properties(caplog):
    # Persistent by default: the service asks for fresh chains, so requests are independent.
    info = info_of("gibbs")
    assert info["stateless"] and info["backend_kwargs"]["persistent"] is False
    # Asked for explicitly: believed (the old signature probe called this one stateful).
    assert info_of("gibbs", {"persistent": False})["stateless"]
    assert not info_of("gibbs", {"persistent": True})["stateless"]
    # A wrapper declares its child's persistence; it has no `persistent` option itself.
    fresh_child = {"backend": "gibbs", "backend_kwargs": {"persistent": False}}
    assert info_of("calibrated", fresh_child)["stateless"]
    with caplog.at_level(logging.WARNING, logger="scqbm.samplers.service._app"):
        info = info_of("calibrated", {"backend": "gibbs"})
    assert not info["stateless"] and "persistent" not in info["backend_kwargs"]
    assert any("declares persistent chains" in r.getMessage() for r in caplog.records)
    # Backends without chains are stateless whatever their constructor looks like.
    assert info_of("failing_declared")["stateless"]


# --------------------------------------------------------------------- the cost
def test_the_cost_of_a_read_is_declared_by_the_sampler():
    assert GibbsSampler(4, num_sweeps=3, burn_in=20).sweeps_per_read == 23
    tempering = ParallelTemperingSampler(4, num_temps=4, num_sweeps=1, burn_in=9)
    assert tempering.sweeps_per_read == 40
    assert info_of("gibbs", {"burn_in": 20, "num_sweeps": 3})["sweeps_per_read"] == 23
    # Through a wrapper: the child's cost (a getattr guess on the wrapper found 1).
    wrapped = {"backend": "gibbs", "backend_kwargs": {"burn_in": 50, "persistent": False}}
    assert info_of("calibrated", wrapped)["sweeps_per_read"] == 51
    assert info_of("failing_declared")["sweeps_per_read"] == 1000
    assert RemoteSampler(4, "http://127.0.0.1:9").sweeps_per_read == 1


def test_the_declared_cost_prices_the_compute_budget():
    limits = ServiceLimits(max_work=10**6)
    app = create_app("failing_declared", {"sweeps": 1000}, token=TOKEN, limits=limits)
    h, W, _ = problem("bm", 16)
    body = {"h": encode_array(h.numpy()), "W": encode_array(W.numpy())}
    try:
        with TestClient(app) as client:
            # 16 units x 100 reads x 1000 sweeps = 1.6e6 > 1e6.
            over = client.post("/v1/sample", json={**body, "num_reads": 100}, headers=AUTH)
            within = client.post("/v1/sample", json={**body, "num_reads": 50}, headers=AUTH)
    finally:
        app.state.pool.close()
    assert over.status_code == 413 and over.json()["error"]["code"] == "too_much_work"
    assert "x 1000 sweeps" in over.json()["error"]["message"]
    assert within.status_code == 200, within.text


# -------------------------------------------------------------------- preflight
def test_preflight_is_part_of_the_sampler_interface():
    # The base class declares it, doing nothing: every backend has one to call.
    assert GibbsSampler(4).preflight() is None
    assert "preflight" in BoltzmannSampler.__dict__
    with pytest.raises(SamplerUnavailable, match="no licence here"):
        create_app("failing_preflight", token=TOKEN)
    # A wrapper checks its child (a getattr probe on the wrapper found nothing to call).
    with pytest.raises(SamplerUnavailable, match="no licence here"):
        create_app("calibrated", {"backend": "failing_preflight"}, token=TOKEN)


def test_serve_sampler_fails_at_startup_when_preflight_fails(capsys, monkeypatch):
    from scqbm.cli import main

    monkeypatch.setenv("SCQBM_SAMPLER_TOKEN", TOKEN)
    assert main(["serve-sampler", "--backend", "failing_preflight"]) == 2
    assert "no licence here" in capsys.readouterr().err


# ----------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "fail,status,code,phrase",
    [
        ("unavailable", 503, "backend_unavailable", "no licence on this host"),
        ("fault", 500, "backend_error", "SamplerError: the device reported a fault"),
    ],
)
def test_backend_failures_map_by_their_common_root(fail, status, code, phrase):
    app = create_app("failing_declared", {"sweeps": 1, "fail": fail}, token=TOKEN)
    body = {"h": [0.0, 0.1], "W": [[0.0, 0.2], [0.2, 0.0]], "num_reads": 4}
    try:
        with TestClient(app) as client:
            response = client.post("/v1/sample", json=body, headers=AUTH)
    finally:
        app.state.pool.close()
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code and phrase in response.text


def test_the_service_does_not_name_backend_exceptions():
    source = open(_app.__file__).read()
    assert "Kaiwu" not in source and "inspect.signature" not in source
    assert "getattr(" not in source.split("def create_app")[0]


# ------------------------------------------------------------------- validation
def test_the_service_validates_with_the_samplers_check(monkeypatch):
    calls = []
    real = _app.validate_problem

    def spy(h, W, *args, **kwargs):
        calls.append(kwargs)
        return real(h, W, *args, **kwargs)

    monkeypatch.setattr(_app, "validate_problem", spy)
    W = torch.zeros(4, 4)
    W[:2, 2:] = 0.3
    W[2:, :2] = 0.3
    body = {"h": [0.0] * 4, "W": W.tolist(), "num_reads": 2, "n_visible": 2}
    _, _, reads, n_visible = _app._parse(json.dumps(body).encode(), ServiceLimits(), 1)
    assert calls == [{"n_visible": 2}] and n_visible == 2 and reads == 2
    W[0, 1] = W[1, 0] = 0.5  # couples the first side within itself
    body["W"] = W.tolist()
    with pytest.raises(_app.ServiceError, match="not a bipartite") as refused:
        _app._parse(json.dumps(body).encode(), ServiceLimits(), 1)
    assert refused.value.status == 422


# ---------------------------------------------------------------- the client
def test_the_remote_sampler_declares_parameters_and_properties():
    sampler = RemoteSampler(4, "http://127.0.0.1:9", num_chains=64)
    assert sampler.properties == {"persistent": False, "num_reads": 64}
    assert RemoteSampler(4, "http://127.0.0.1:9", num_chains=None).properties["num_reads"] is None
    assert set(sampler.parameters) == {"num_reads", "n_visible"}
    with pytest.raises(TypeError, match=r"does not accept \['seed'\]"):
        sampler.sample(torch.zeros(4), torch.zeros(4, 4), 4, seed=1)
    with pytest.raises(ValueError, match="num_chains"):
        RemoteSampler(4, "http://127.0.0.1:9", num_chains=0)
    assert issubclass(ServiceUnavailable, SamplerUnavailable)
    assert issubclass(ServiceConfigurationError, SamplerError)
    assert not issubclass(ServiceConfigurationError, SamplerUnavailable)  # not transient
    # The fallback keeps its own chains of the declared size.
    fallback = RemoteSampler(4, "http://127.0.0.1:9", num_chains=32, on_failure="fallback")
    assert fallback.fallback.num_chains == 32


def test_a_model_draws_the_remote_samplers_declared_reads():
    import scvi

    from scqbm import QBMVAE

    scvi.settings.seed = 0
    adata = scvi.data.synthetic_iid(batch_size=20, n_genes=10, n_batches=1, n_labels=1)
    QBMVAE.setup_anndata(adata)
    kwargs = {"url": "http://127.0.0.1:9", "num_chains": 64}
    model = QBMVAE(adata, n_latent=4, n_hidden=8, sampler="remote", sampler_kwargs=kwargs)
    # It asked for 512 reads per step before declaring its num_chains.
    assert model.module.num_negative_samples == 64
