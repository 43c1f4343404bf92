"""The sampling service and the ``remote`` sampler, for real over loopback."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
from test_samplers_backends import check_against_exact, problem

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from scqbm.samplers import RemoteSampler, SamplerError, ServiceUnavailable, make_sampler  # noqa: E402
from scqbm.samplers.service import (  # noqa: E402
    BackgroundServer,
    ServiceLimits,
    create_app,
    encode_array,
    serve_in_background,
)

TOKEN = "s3cret-token"
LIMITS = ServiceLimits(max_spins=64, max_reads=30_000, max_payload_bytes=100_000)


@pytest.fixture(scope="module")
def server():
    with serve_in_background("gibbs", {"burn_in": 50}, token=TOKEN, limits=LIMITS) as running:
        yield running


def post(server, body, token=TOKEN, **kwargs):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if isinstance(body, dict):
        kwargs["json"] = body
    else:
        kwargs["content"] = body
    return httpx.post(f"{server.url}/v1/sample", headers=headers, timeout=30, **kwargs)


def small_body(**changes):
    body = {
        "h": [0.1, -0.2, 0.3],
        "W": [[0, 0.5, 0], [0.5, 0, -0.4], [0, -0.4, 0]],
        "num_reads": 4,
    }
    return {**body, **changes}


# ------------------------------------------------------------------------ samples
@pytest.mark.parametrize("structure,n", [("bm", 10), ("rbm", 12)])
def test_remote_samples_match_exact_enumeration(server, structure, n):
    h, W, n_visible = problem(structure, n)
    sampler = make_sampler("remote", n, url=server.url, token=TOKEN)
    result = sampler.sample(h, W, 10000, n_visible=n_visible)
    # The service runs fresh chains per request: the reads are independent samples.
    check_against_exact(result.samples[None], h, W)
    info = result.info
    assert info["backend"] == "gibbs" and info["attempts"] == 1 and not info["persistent"]
    assert info["sweeps"] == 51 and info["server_seconds"] <= info["seconds"]


def test_concurrent_clients_get_correct_samples(server):
    h, W, _ = problem("bm", 10, seed=9)
    results, errors = [], []

    def client():
        sampler = RemoteSampler(10, server.url, token=TOKEN)
        try:
            results.extend(sampler.sample(h, W, 2000).samples for _ in range(3))
        except Exception as err:  # reported below; a thread cannot fail the test itself
            errors.append(err)

    threads = [threading.Thread(target=client) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors and len(results) == 12
    check_against_exact(torch.cat(results)[None], h, W)


# ------------------------------------------------------------------ authentication
def test_requests_without_the_right_token_are_rejected(server):
    missing = post(server, small_body(), token=None)
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
    assert "Authorization: Bearer" in missing.json()["error"]["message"]
    wrong = post(server, small_body(), token="guess")
    assert wrong.status_code == 403 and wrong.json()["error"] == {
        "code": "forbidden",
        "message": "Invalid token.",
    }
    assert httpx.get(f"{server.url}/v1/info").status_code == 401
    info = httpx.get(f"{server.url}/v1/info", headers={"Authorization": f"Bearer {TOKEN}"})
    assert info.json()["limits"]["max_spins"] == 64 and info.json()["stateless"]
    assert httpx.get(f"{server.url}/v1/health").json() == {"status": "ok"}
    # A refused token is a configuration error: raised at once, never a fallback.
    h, W, _ = problem("bm", 4)
    sampler = RemoteSampler(4, server.url, token="guess", on_failure="fallback", backoff=10)
    start = time.monotonic()
    with pytest.raises(SamplerError, match=r"HTTP 403\): Invalid token"):
        sampler.sample(h, W, 8)
    assert time.monotonic() - start < 5 and sampler.fallbacks == 0  # a retry sleeps >= 5 s


def test_the_token_can_come_from_the_environment(server, monkeypatch):
    monkeypatch.setenv("SCQBM_SAMPLER_TOKEN", TOKEN)
    h, W, _ = problem("bm", 4)
    assert RemoteSampler(4, server.url).sample(h, W, 8).samples.shape == (8, 4)


# ------------------------------------------------------------- malformed requests
NAN_BODY = b'{"h": [0, NaN], "W": [[0, 1], [1, 0]], "num_reads": 2}'
MALFORMED = [
    (b"{not json", 400, "bad_json", "not valid JSON"),
    (small_body(W=None) | {"W": None}, 422, "invalid_request", "W"),
    ({"h": [0.0], "num_reads": 2}, 422, "invalid_request", "W: Field required"),
    (small_body(num_reads=0), 422, "invalid_request", "num_reads: Input should be greater"),
    (small_body(num_reads="4"), 422, "invalid_request", "num_reads"),
    (small_body(extra=1), 422, "invalid_request", "extra: Extra inputs are not permitted"),
    (small_body(W=[[0, 0.5, 0], [0.4, 0, 0], [0, 0, 0]]), 422, "invalid_problem", "symmetric"),
    (small_body(W=[[1, 0, 0], [0, 0, 0], [0, 0, 0]]), 422, "invalid_problem", "zero diagonal"),
    (small_body(h=[0.0, 0.0]), 422, "invalid_problem", "Expected h of shape (n,)"),
    (small_body(W=[[0, 1], [1]]), 422, "invalid_request", "rectangular"),
    (NAN_BODY, 422, "invalid_problem", "NaN or infinite"),
    (small_body(h={"dtype": "float32", "shape": [3], "data": "@@"}), 422, "", "base64"),
    (small_body(h={"dtype": "float32", "shape": [4], "data": "AAAAAA=="}), 422, "", "needs 16"),
    (small_body(h={"dtype": "int8", "shape": [3], "data": ""}), 422, "", "h.dtype"),
    (small_body(n_visible=1), 422, "invalid_problem", "not a bipartite"),
    (small_body(n_visible=3), 422, "invalid_problem", "between 1 and 2"),
]


@pytest.mark.parametrize("body,status,code,phrase", MALFORMED)
def test_malformed_requests_get_clear_errors(server, body, status, code, phrase):
    response = post(server, body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert phrase in error["message"] and (not code or error["code"] == code)


def test_oversized_requests_are_refused(server):
    n = 65
    too_many_spins = {
        "h": encode_array(np.zeros(n)),
        "W": encode_array(np.zeros((n, n))),
        "num_reads": 2,
    }
    response = post(server, too_many_spins)
    assert response.status_code == 413 and "at most 64 (max_spins)" in response.text
    response = post(server, small_body(num_reads=30_001))
    assert response.status_code == 413 and "limit of 30000 (max_reads)" in response.text
    padded = json.dumps(small_body(comment="x" * 150_000)).encode()
    response = post(server, padded)
    assert response.status_code == 413 and "100000 bytes" in response.text
    # Without a Content-Length (chunked upload) the limit is enforced while reading.
    response = post(server, iter([padded[:60_000], padded[60_000:]]))
    assert response.status_code == 413 and "max_payload_bytes" in response.text
    # The client reports the service's reason and does not retry a refusal.
    h, W, _ = problem("bm", n)
    with pytest.raises(SamplerError, match=r"HTTP 413\): The problem has 65 units"):
        RemoteSampler(n, server.url, token=TOKEN).sample(h, W, 2)


# ------------------------------------------------------------- retries, timeouts
class Flaky:
    """ASGI wrapper that answers 503 to the first ``failures`` requests or delays them."""

    def __init__(self, app, failures=0, delay=0.0):
        self.app, self.failures, self.delay, self.requests = app, failures, delay, 0

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] == "/v1/sample":
            self.requests += 1
            if self.requests <= self.failures:
                await send({"type": "http.response.start", "status": 503, "headers": []})
                await send({"type": "http.response.body", "body": b"busy"})
                return
            await asyncio.sleep(self.delay)
        await self.app(scope, receive, send)


def flaky_server(**kwargs):
    flaky = Flaky(create_app("gibbs", token=TOKEN), **kwargs)
    return flaky, BackgroundServer(flaky, token=TOKEN).start()


def test_transient_failures_are_retried_with_backoff():
    h, W, _ = problem("bm", 5)
    flaky, running = flaky_server(failures=2)
    try:
        sampler = RemoteSampler(5, running.url, token=TOKEN, max_retries=2, backoff=0.2)
        start = time.monotonic()
        result = sampler.sample(h, W, 16)
        # Backoff 0.2 then 0.4 s, each with jitter in [50%, 100%].
        assert time.monotonic() - start >= 0.5 * (0.2 + 0.4)
        assert result.info["attempts"] == 3 and flaky.requests == 3
        flaky.requests, flaky.failures = 0, 5
        with pytest.raises(ServiceUnavailable, match="failed 3 attempts; last error: HTTP 503"):
            sampler.sample(h, W, 16)
    finally:
        running.stop()


def test_slow_answers_time_out():
    h, W, _ = problem("bm", 5)
    flaky, running = flaky_server(delay=3.0)
    try:
        sampler = RemoteSampler(5, running.url, token=TOKEN, timeout=0.3, max_retries=1, backoff=0)
        start = time.monotonic()
        with pytest.raises(ServiceUnavailable, match="ReadTimeout"):
            sampler.sample(h, W, 16)
        # Two attempts of 0.3 s each, well before the 3 s answer.
        assert time.monotonic() - start < 2.5 and flaky.requests == 2
    finally:
        running.stop()


# ------------------------------------------------------ service lost during training
@pytest.fixture
def adata():
    import scvi

    from scqbm import QBMVAE

    scvi.settings.seed = 0
    data = scvi.data.synthetic_iid(batch_size=100, n_genes=30, n_batches=2, n_labels=2)
    QBMVAE.setup_anndata(data, batch_key="batch")
    return data


class StopServerAfterFirstEpoch:
    """Lightning callback that stops the sampling service when epoch 0 ends."""

    def __new__(cls, server):
        from lightning.pytorch.callbacks import Callback

        class _Stop(Callback):
            def on_train_epoch_end(self, trainer, pl_module):
                if trainer.current_epoch == 0:
                    server.stop()

        return _Stop()


def train_with_remote(adata, server, on_failure, monkeypatch):
    from scqbm import QBMVAE

    monkeypatch.setenv("SCQBM_SAMPLER_TOKEN", TOKEN)
    kwargs = {
        "url": server.url,
        "num_chains": 64,
        "on_failure": on_failure,
        "max_retries": 1,
        "backoff": 0.01,
        "connect_timeout": 1.0,
    }
    model = QBMVAE(adata, n_latent=6, n_hidden=16, sampler="remote", sampler_kwargs=kwargs)
    model.train(
        max_epochs=3,
        batch_size=50,
        train_size=1.0,
        enable_progress_bar=False,
        callbacks=[StopServerAfterFirstEpoch(server)],
    )
    return model


def test_service_lost_mid_training_falls_back_and_is_counted(adata, monkeypatch, caplog, tmp_path):
    from scqbm import QBMVAE

    server = serve_in_background("gibbs", token=TOKEN)
    with caplog.at_level(logging.WARNING, logger="scqbm.samplers._remote"):
        model = train_with_remote(adata, server, "fallback", monkeypatch)
    fallbacks = model.history["sampler_fallbacks"].iloc[:, 0].tolist()
    steps = math.ceil(adata.n_obs / 50)
    assert fallbacks == [0.0, steps, steps]
    assert model.module.sampler.fallbacks == 2 * steps
    warnings = [r for r in caplog.records if "drawing from local Gibbs chains" in r.message]
    assert len(warnings) == 1  # the first fallback is logged; all are counted
    # The fallback chains are a buffer: saved and strictly reloaded; the token (from the
    # environment) is not among the saved constructor arguments.
    model.save(tmp_path / "model")
    loaded = QBMVAE.load(tmp_path / "model", adata=adata)
    chains = model.module.sampler.fallback.state
    assert torch.equal(loaded.module.sampler.fallback.state, chains)
    assert TOKEN not in repr(loaded.init_params_)


def test_service_lost_mid_training_raises_by_default(adata, monkeypatch):
    server = serve_in_background("gibbs", token=TOKEN)
    with pytest.raises(SamplerError, match=r"failed at training step \d+ \(epoch 1\).*2 attempts"):
        train_with_remote(adata, server, "raise", monkeypatch)


def test_training_history_reports_the_calibrated_temperature(adata):
    # A backend that samples exactly at inverse temperature 2: calibration must find 2.
    pytest.importorskip("dwave.samplers")
    from scqbm import QBMVAE

    backend = {"sampler": "tree_decomposition", "beta": 2.0, "seed": 0, "marginals": False}
    model = QBMVAE(
        adata,
        n_latent=8,
        n_hidden=16,
        sampler="calibrated",
        sampler_kwargs={"backend_kwargs": backend, "calibrate_every": 1},
    )
    with torch.no_grad():  # a prior far from flat, so the temperature is identifiable
        model.module.prior.h.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(0))
        model.module.prior.couplings.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(1))
    model.train(
        max_epochs=2,
        batch_size=50,
        train_size=1.0,
        enable_progress_bar=False,
        plan_kwargs={"lr_prior": 1e-4},
    )
    betas = model.history["sampler_effective_beta"].iloc[:, 0]
    # Per estimate: relative standard error 1 / sqrt(N Var E) with N = 512 reads, here < 5%.
    assert len(betas) == 2 and ((betas - 2.0).abs() < 0.2).all(), betas.tolist()


# ------------------------------------------------------------------- the command
def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_scqbm_serve_sampler_command(monkeypatch):
    from scqbm.cli import main

    # Refuses to start without a token (and says why) instead of serving openly.
    monkeypatch.delenv("SCQBM_SAMPLER_TOKEN", raising=False)
    assert main(["serve-sampler", "--backend", "gibbs"]) == 2
    if not torch.cuda.is_available():
        assert main(["serve-sampler", "--token", "t", "--device", "cuda"]) == 2
    assert (
        main(
            [
                "serve-sampler",
                "--backend",
                "gibbs",
                "--token",
                "t",
                "--backend-kwargs",
                '{"num_sweep": 1}',
            ]
        )
        == 2
    )
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "scqbm.cli",
        "serve-sampler",
        "--backend",
        "parallel_tempering",
        "--port",
        str(port),
        "--token",
        TOKEN,
        "--max-spins",
        "16",
        "--log-level",
        "warning",
    ]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while True:
            try:
                if httpx.get(f"{url}/v1/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert process.poll() is None and time.monotonic() < deadline, "server did not start"
            time.sleep(0.2)
        h, W, n_visible = problem("rbm", 6)
        result = RemoteSampler(6, url, token=TOKEN).sample(h, W, 32, n_visible=n_visible)
        assert result.samples.shape == (32, 6) and len(result.info["swap_acceptance"]) == 7
        h, W, _ = problem("bm", 17)
        with pytest.raises(SamplerError, match="at most 16"):
            RemoteSampler(17, url, token=TOKEN).sample(h, W, 2)
    finally:
        process.terminate()
        output = process.communicate(timeout=30)[0]
    assert "backend 'parallel_tempering'" in output and "token required" in output
