"""The sampling service under load, faults and hostile input (loopback only, bounded)."""

from __future__ import annotations

import json
import logging
import random
import socket
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import pytest
import torch
from test_samplers_backends import problem

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from scqbm.samplers import (  # noqa: E402
    BoltzmannSampler,
    RemoteSampler,
    SamplerUnavailable,
    register_sampler,
)
from scqbm.samplers.service import ServiceLimits, encode_array, serve_in_background  # noqa: E402
from scqbm.samplers.service._ratelog import RateLimitedLog  # noqa: E402

TOKEN = "load-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def body_for(n, reads, seed=0, **extra):
    h, W, _ = problem("bm", n, seed=seed)
    return {
        "h": encode_array(h.numpy()),
        "W": encode_array(W.numpy()),
        "num_reads": reads,
        **extra,
    }


def post(url, body, timeout=60.0, **kwargs):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(
        f"{url}/v1/sample",
        content=content,
        headers={**AUTH, "Content-Type": "application/json"},
        timeout=timeout,
        **kwargs,
    )


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def raw_health(port: int, timeout: float = 5.0) -> float:
    """Seconds for a new connection to get ``GET /v1/health`` answered (no client overhead)."""
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert sock.recv(100).startswith(b"HTTP/1.1 200")
    return time.monotonic() - start


# --------------------------------------------------------------- connections
def test_idle_connection_flood_with_a_low_file_limit(tmp_path):
    """1,000 idle sockets against a server allowed 256 files: health answers within 1 s."""
    port = free_port()
    log = tmp_path / "server.log"
    code = (
        "import resource, sys; resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256));"
        "from scqbm.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    command = [
        sys.executable,
        "-c",
        code,
        "serve-sampler",
        "--allow-no-token",
        "--port",
        str(port),
        "--log-level",
        "warning",
        "--header-timeout",
        "30",
    ]
    with open(log, "w") as handle:
        server = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT)
    sockets = []
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while True:
            try:
                if httpx.get(f"{url}/v1/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert server.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        times = []
        for i in range(1000):
            sock = socket.socket()
            sock.settimeout(2)
            sock.connect(("127.0.0.1", port))
            sockets.append(sock)
            if i % 250 == 249:  # during the flood, too
                times.append(raw_health(port))
        times += [raw_health(port) for _ in range(5)]
        assert max(times) < 1.0, times
        # The oldest idle sockets were closed to make room (a read sees EOF or a reset).
        closed = 0
        for sock in sockets[:100]:
            try:
                closed += sock.recv(1) == b""
            except (ConnectionResetError, TimeoutError, OSError):
                closed += 1
        assert closed == 100
    finally:
        for sock in sockets:
            sock.close()
        server.terminate()
        server.wait(timeout=30)
    # No traceback flood: the log stays small.
    assert log.stat().st_size < 20_000, log.read_text()[-2000:]


@pytest.fixture(scope="module")
def quick():
    """A server with short timeouts and small limits for the fault tests."""
    limits = ServiceLimits(
        max_spins=256,
        header_timeout=0.5,
        body_timeout=0.5,
        keep_alive_timeout=0.5,
        max_work=256 * 2048 * 101,
        workers=2,
    )
    with serve_in_background("gibbs", token=TOKEN, limits=limits) as running:
        yield running


def test_a_stalled_request_head_is_disconnected(quick):
    with socket.create_connection(("127.0.0.1", quick.port)) as sock:
        sock.sendall(b"POST /v1/sample HTTP/1.1\r\nHost: x\r\n")  # never finishes the head
        sock.settimeout(5)
        start = time.monotonic()
        assert sock.recv(100) == b""
        assert 0.3 < time.monotonic() - start < 3


def test_a_slow_body_gets_408(quick):
    with socket.create_connection(("127.0.0.1", quick.port)) as sock:
        sock.sendall(
            b"POST /v1/sample HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
            + TOKEN.encode()
            + b"\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"
        )
        sock.settimeout(5)
        start = time.monotonic()
        data = b""
        for _ in range(10):  # one byte every 0.2 s: the body never completes in time
            sock.sendall(b" ")
            time.sleep(0.2)
            try:
                sock.setblocking(False)
                data += sock.recv(4096)
            except BlockingIOError:
                pass
            finally:
                sock.setblocking(True)
            if data:
                break
        sock.settimeout(5)
        while b"}}" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    assert data.startswith(b"HTTP/1.1 408") and b'"body_timeout"' in data
    assert time.monotonic() - start < 3


def test_unparseable_http_gets_the_json_error_shape(quick):
    with socket.create_connection(("127.0.0.1", quick.port)) as sock:
        sock.sendall(b"GARBAGE\x00\x01 / HTTP/9\r\n\r\n")
        sock.settimeout(5)
        data = b""
        while chunk := sock.recv(4096):  # the server closes after the answer
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400")
    assert json.loads(body)["error"]["code"] == "bad_http"


# ------------------------------------------------------------------- logging
class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []

    def emit(self, record):
        self.records.append(record)


def test_the_rate_limited_log_counts_what_it_suppresses():
    now = [0.0]
    records = _Records()
    target = logging.getLogger("scqbm.tests.ratelog")
    target.addHandler(records)
    target.setLevel(logging.DEBUG)
    try:
        log = RateLimitedLog(target, interval=10.0, clock=lambda: now[0])
        assert log.warning("bad request from %s", "a")
        for step in range(29):
            now[0] = 0.3 * step
            assert not log.warning("bad request from %s", "b")
        assert log.warning("another message")  # messages are throttled separately
        assert log.suppressed("bad request from %s") == 29
        now[0] = 10.5
        assert log.warning("bad request from %s", "c")
        assert log.suppressed("bad request from %s") == 0
        now[0] = 25.0
        assert log.warning("100% sure")  # no arguments: not a format string
        assert not log.warning("100% sure")
        now[0] = 40.0
        assert log.warning("100% sure")
    finally:
        target.removeHandler(records)
    lines = [r.getMessage() for r in records.records]
    assert lines == [
        "bad request from a",
        "another message",
        "bad request from c (29 more like this in the last 10 s)",
        "100% sure",
        "100% sure (1 more like this in the last 15 s)",
    ]


def test_malformed_http_requests_are_logged_once_per_interval():
    records = _Records()
    uvicorn_log = logging.getLogger("uvicorn.error")
    with serve_in_background("gibbs", token=TOKEN) as server:
        uvicorn_log.addHandler(records)
        try:
            for _ in range(30):
                with socket.create_connection(("127.0.0.1", server.port)) as sock:
                    sock.sendall(b"GARBAGE\x00\r\n\r\n")
                    sock.settimeout(5)
                    assert sock.recv(100).startswith(b"HTTP/1.1 400")
        finally:
            uvicorn_log.removeHandler(records)
        quiet = server._server.config.http.malformed_log
    invalid = [r for r in records.records if "Invalid HTTP request" in r.getMessage()]
    # uvicorn alone logs one warning per request: 30 lines.
    assert len(invalid) == 1 and quiet.suppressed("Invalid HTTP request received.") == 29


class _Unavailable(BoltzmannSampler):
    name = "failing_unavailable"

    def __init__(self, n_units: int):
        super().__init__()

    def _sample(self, h, W, num_reads, n_visible):
        raise SamplerUnavailable("no licence on this host")


register_sampler(_Unavailable.name, _Unavailable)


def test_a_backend_failing_every_request_is_logged_once_per_interval(caplog):
    body = {"h": [0.0, 0.1], "W": [[0.0, 0.2], [0.2, 0.0]], "num_reads": 4}
    with serve_in_background("failing_unavailable", token=TOKEN) as server:
        with caplog.at_level(logging.ERROR, logger="scqbm.samplers.service._app"):
            statuses = [post(server.url, body).status_code for _ in range(20)]
        quiet = server.app.state.request_log
    assert statuses == [503] * 20
    lines = [r for r in caplog.records if "unavailable" in r.getMessage()]
    assert len(lines) == 1 and quiet.suppressed("backend %r unavailable: %s") == 19


# ------------------------------------------------------------------- fuzzing
def _fuzz_cases(rng: random.Random, count: int):
    """Malformed bodies: broken JSON, hostile numbers and nesting, wrong types and shapes."""
    valid = {"h": [0.1, -0.2, 0.3], "W": [[0, 0.5, 0], [0.5, 0, -0.4], [0, -0.4, 0]]}
    weird = [
        None,
        True,
        0,
        -1,
        1.5,
        10**400,
        10**300,
        float("inf"),
        "",
        "x" * 1000,
        [],
        [[]],
        {},
        [1, [2, [3]]],
        {"dtype": "float32", "shape": [0], "data": ""},
        {"dtype": "float32", "shape": [3.0], "data": "AAAAAAAAAAAAAAAA"},
        {"dtype": ["float32"], "shape": [3], "data": ""},
        {"dtype": "float32", "shape": [True, 3], "data": ""},
        {"dtype": "float32", "shape": [10**30], "data": ""},
        {"dtype": "float32", "shape": [2, 2, 2], "data": "A" * 44},
        {"dtype": "float64", "shape": [3], "data": None},
        {"dtype": "float32", "shape": -1, "data": "!!"},
    ]
    raw = [
        b"",
        b"{",
        b"[" * 5000 + b"]" * 5000,
        b'{"h": ' + b"[" * 2000 + b"]" * 2000 + b', "W": [], "num_reads": 1}',
        b'{"h": [0], "W": [[0]], "num_reads": ' + b"9" * 5000 + b"}",
        b'{"h": [1e400], "W": [[0]], "num_reads": 1}',
        b'{"h": [' + b"1" * 500 + b'], "W": [[0]], "num_reads": 1}',
        b"\xff\xfe\x00",
        b"null",
        b"[]",
        b'"string"',
        b'{"h": [], "W": [], "num_reads": 1}',
        b'{"h": {"dtype": "float32", "shape": [0], "data": ""}, "W": {"dtype": "float32", '
        b'"shape": [0, 0], "data": ""}, "num_reads": 1}',
    ]
    cases = list(raw)
    while len(cases) < count:
        body: dict = {**valid, "num_reads": 4}
        for _ in range(rng.randint(1, 3)):
            key = rng.choice(["h", "W", "num_reads", "n_visible", "extra", "drop"])
            if key == "drop":
                body.pop(rng.choice(list(body)), None)
            else:
                body[key] = rng.choice(weird)
        try:
            cases.append(json.dumps(body).encode())
        except (ValueError, OverflowError):
            cases.append(repr(body).encode())
    return cases


def test_fuzzed_requests_never_get_a_500(quick):
    cases = _fuzz_cases(random.Random(0), 240)
    assert len(cases) >= 200
    statuses = {}
    with httpx.Client(timeout=30) as client:
        for body in cases:
            response = client.post(
                f"{quick.url}/v1/sample",
                content=body,
                headers={**AUTH, "Content-Type": "application/json"},
            )
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
            if response.status_code != 200:
                assert 400 <= response.status_code < 500, (body[:200], response.text)
                error = response.json()["error"]
                assert set(error) == {"code", "message"} and error["message"]
    assert set(statuses) - {200} and 500 not in statuses
    assert httpx.get(f"{quick.url}/v1/health", timeout=1).status_code == 200


def test_the_service_samples_at_the_precision_the_client_sent():
    import numpy as np
    import torch

    from scqbm.samplers.service import _app

    limits = ServiceLimits()
    single = json.dumps(body_for(4, 8)).encode()  # encoded float32 arrays
    h, W, _, _ = _app._parse(single, limits, 1)
    assert h.dtype == W.dtype == torch.float32
    double = body_for(4, 8)
    double["W"] = encode_array(np.zeros((4, 4)), "float64")
    h, W, _, _ = _app._parse(json.dumps(double).encode(), limits, 1)
    assert h.dtype == W.dtype == torch.float64
    listed = {"h": [0.0, 0.1], "W": [[0.0, 0.2], [0.2, 0.0]], "num_reads": 2}
    assert _app._parse(json.dumps(listed).encode(), limits, 1)[0].dtype == torch.float64


def test_compute_budget_and_empty_problems_are_refused(quick):
    response = post(quick.url, body_for(256, 4000))
    assert response.status_code == 413
    error = response.json()["error"]
    assert error["code"] == "too_much_work" and "at most 2048 reads" in error["message"]


# ---------------------------------------------------------------- scheduling
def test_64_concurrent_clients_all_get_correct_answers(quick):
    h, W, _ = problem("bm", 64, seed=3)
    errors, seconds = [], []

    def client():
        sampler = RemoteSampler(64, quick.url, token=TOKEN)
        try:
            start = time.monotonic()
            result = sampler.sample(h, W, 512)
            seconds.append(time.monotonic() - start)
            assert result.samples.shape == (512, 64)
            assert set(result.samples.unique().tolist()) <= {0.0, 1.0}
        except Exception as err:  # reported below; a thread cannot fail the test itself
            errors.append(err)

    threads = [threading.Thread(target=client) for _ in range(64)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors, errors[:3]
    assert len(seconds) == 64 and max(seconds) < 60


def test_a_small_request_does_not_wait_for_a_big_one():
    limits = ServiceLimits(workers=1, max_work=10**10)
    with serve_in_background("gibbs", token=TOKEN, limits=limits) as server:
        small = body_for(16, 64)
        post(server.url, small)  # warm up the compiled kernel and the backend cache
        start = time.monotonic()
        post(server.url, small)
        alone = time.monotonic() - start
        big_result = {}

        def big():
            start = time.monotonic()
            big_result["response"] = post(server.url, body_for(128, 3000, seed=1))
            big_result["seconds"] = time.monotonic() - start

        thread = threading.Thread(target=big)
        thread.start()
        time.sleep(0.5)  # the big request is running now
        start = time.monotonic()
        response = post(server.url, small)
        behind = time.monotonic() - start
        thread.join(120)
    assert response.status_code == 200 and big_result["response"].status_code == 200
    # One chunk of the big request (~0.1 s of work) plus the small one, not the whole big one.
    assert behind < alone + 0.5 and big_result["seconds"] > 3 * behind, (
        alone,
        behind,
        big_result["seconds"],
    )


class _SlowFake:
    """Stands in for a backend: 0.3 s per call on 256 units, 0.01 s on small problems."""

    def __init__(self, n_units):
        self.seconds = 0.3 if n_units >= 256 else 0.01

    def sample(self, h, W, num_reads, n_visible=None):
        time.sleep(self.seconds)
        return SimpleNamespace(samples=torch.zeros(num_reads, h.shape[0]), info={})


@pytest.mark.parametrize("express", [1, 0])
def test_the_express_lane_starts_a_small_request_while_workers_are_busy(express):
    from scqbm.samplers.service._pool import SamplingPool

    pool = SamplingPool(_SlowFake, workers=1, max_queue=8, chunkable=True, express=express)
    try:
        far = time.monotonic() + 60
        big = pool.submit(torch.zeros(256), torch.zeros(256, 256), 1024, None, 101, far)
        time.sleep(0.1)  # the worker is inside a 0.3 s chunk of the big request
        small = pool.submit(torch.zeros(8), torch.zeros(8, 8), 4, None, 101, far)
        _, info = small.future.result(timeout=10)
        assert not big.future.done()  # the big one goes on meanwhile
    finally:
        pool.close()
    if express:
        assert info["queue_seconds"] < 0.1, info
    else:  # without the lane it waits for the running chunk to end
        assert info["queue_seconds"] > 0.1, info


def test_work_of_a_client_that_gave_up_is_cancelled():
    limits = ServiceLimits(workers=1, max_work=10**10)
    with serve_in_background("gibbs", token=TOKEN, limits=limits) as server:
        pool = server.app.state.pool
        with pytest.raises(httpx.ReadTimeout):
            post(server.url, body_for(128, 9000), timeout=0.5)
        deadline = time.monotonic() + 5
        while pool.stats()["jobs"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert pool.stats()["jobs"] == 0
        start = time.monotonic()
        assert post(server.url, body_for(16, 64)).status_code == 200
        assert time.monotonic() - start < 2


def test_a_full_queue_gets_429_with_retry_after_and_the_deadline_holds():
    limits = ServiceLimits(workers=1, max_queue=1, max_work=10**10, deadline_seconds=1.0)
    with serve_in_background("gibbs", token=TOKEN, limits=limits) as server:
        answers = {}

        def big():
            answers["big"] = post(server.url, body_for(128, 9000))

        thread = threading.Thread(target=big)
        thread.start()
        time.sleep(0.3)
        full = post(server.url, body_for(8, 8))
        thread.join(30)
    assert full.status_code == 429 and int(full.headers["retry-after"]) >= 1
    assert full.json()["error"]["code"] == "queue_full"
    late = answers["big"]
    assert late.status_code == 503 and late.json()["error"]["code"] == "deadline_exceeded"
    assert "retry-after" in late.headers


def test_chunked_samples_follow_the_exact_distribution():
    from test_samplers_backends import check_against_exact

    # Force many small chunks: the chunked reads must still be exact Gibbs samples.
    with serve_in_background("gibbs", {"burn_in": 50}, token=TOKEN) as server:
        server.app.state.pool.chunk_cost = 4e7  # ~20 chunks
        h, W, _ = problem("bm", 10, seed=4)
        result = RemoteSampler(10, server.url, token=TOKEN).sample(h, W, 8000)
    assert result.info["chunks"] > 10
    # The service reports its wall time, not the sum over chunks run by two workers at once.
    info = result.info
    assert info["server_seconds"] <= info["seconds"] and info["worker_seconds"] > 0
    check_against_exact(result.samples[None], h, W)


def test_numba_workers_run_in_parallel_with_the_event_loop(quick):
    # While both workers sample, the event loop still answers health checks at once.
    thread = threading.Thread(target=post, args=(quick.url, body_for(200, 2000)))
    thread.start()
    time.sleep(0.3)
    worst = 0.0
    for _ in range(10):
        worst = max(worst, raw_health(quick.port))
        time.sleep(0.05)
    thread.join(60)
    assert worst < 1.0


# ------------------------------------------------------------ a killed server
def test_a_killed_server_mid_training_falls_back(monkeypatch):
    import scvi
    from lightning.pytorch.callbacks import Callback

    from scqbm import QBMVAE

    port = free_port()
    command = [sys.executable, "-m", "scqbm.cli", "serve-sampler", "--port", str(port)]
    monkeypatch.setenv("SCQBM_SAMPLER_TOKEN", TOKEN)
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                raw_health(port, timeout=1)
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline
                time.sleep(0.2)

        class Kill(Callback):
            def on_train_epoch_end(self, trainer, pl_module):
                if trainer.current_epoch == 0:
                    server.kill()  # SIGKILL: no goodbye, sockets just die
                    server.wait(10)

        scvi.settings.seed = 0
        data = scvi.data.synthetic_iid(batch_size=50, n_genes=20, n_batches=2, n_labels=2)
        QBMVAE.setup_anndata(data, batch_key="batch")
        kwargs = {
            "url": f"http://127.0.0.1:{port}",
            "num_chains": 32,
            "on_failure": "fallback",
            "max_retries": 1,
            "backoff": 0.01,
            "connect_timeout": 1.0,
        }
        model = QBMVAE(data, n_latent=6, n_hidden=16, sampler="remote", sampler_kwargs=kwargs)
        model.train(
            max_epochs=2,
            batch_size=50,
            train_size=1.0,
            enable_progress_bar=False,
            callbacks=[Kill()],
        )
    finally:
        server.kill()
        server.wait(10)
    assert model.history["sampler_fallbacks"].iloc[:, 0].tolist() == [0.0, 2.0]
    assert model.is_trained_
