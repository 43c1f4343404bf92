"""The service's worker processes: where chunks run, and what happens when a process dies."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from test_samplers_backends import check_against_exact, problem

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from scqbm.samplers import RemoteSampler, SamplerError  # noqa: E402
from scqbm.samplers.service import ServiceLimits, create_app, serve_in_background  # noqa: E402
from scqbm.samplers.service._processes import spawnable  # noqa: E402

TOKEN = "processes-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def workers_of(server) -> str:
    return httpx.get(f"{server.url}/v1/info", headers=AUTH, timeout=10).json()["workers"]


def lane_of(backend, **kwargs):
    pool = create_app(backend, token=TOKEN, **kwargs).state.pool
    pool.close()
    return pool.lane


def test_auto_uses_processes_for_built_in_backends_and_threads_otherwise():
    import test_service_backend  # noqa: F401 - registers backends at run time

    assert spawnable("gibbs") and spawnable("parallel_tempering")
    assert not spawnable("failing_declared")  # a fresh interpreter does not know it
    threads = ServiceLimits(worker_kind="threads")
    assert lane_of("gibbs") is not None  # children start with the server, not here
    assert lane_of("gibbs", limits=threads) is None
    assert lane_of("failing_declared") is None
    with pytest.raises(ValueError, match="worker_kind='threads'"):
        create_app("failing_declared", token=TOKEN, limits=ServiceLimits(worker_kind="processes"))
    with pytest.raises(ValueError, match="worker_kind must be one of"):
        ServiceLimits(worker_kind="greenlets")


def test_a_killed_worker_process_fails_its_request_and_the_next_one_is_served():
    limits = ServiceLimits(workers=1, max_work=10**10, worker_kind="processes")
    with serve_in_background("gibbs", token=TOKEN, limits=limits) as server:
        assert workers_of(server) == "processes"
        h, W, _ = problem("bm", 10, seed=4)
        client = RemoteSampler(10, server.url, token=TOKEN, max_retries=0)
        # 6,000 reads x 101 sweeps: above the express lane's size, so a worker process runs
        # it; exact like any other draw.
        assert 6000 * 101 * 10 * 74 > server.app.state.pool.express_cost
        check_against_exact(client.sample(h, W, 6000).samples[None], h, W)
        lane = server.app.state.pool.lane
        for process in list(lane._executor._processes.values()):
            os.kill(process.pid, signal.SIGKILL)
        time.sleep(0.5)
        with pytest.raises(SamplerError, match="sampling process of the service died"):
            client.sample(h, W, 6000)
        result = client.sample(h, W, 6000)  # a new process serves the next request
        assert result.samples.shape == (6000, 10)


def test_worker_processes_exit_with_a_killed_service(tmp_path):
    script = tmp_path / "serve.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import time
            from scqbm.samplers.service import ServiceLimits, serve_in_background

            if __name__ == "__main__":
                limits = ServiceLimits(workers=2, worker_kind="processes")
                with serve_in_background("gibbs", token="{TOKEN}", limits=limits) as server:
                    pids = list(server.app.state.pool.lane._executor._processes)
                    print(" ".join(map(str, pids)), flush=True)
                    time.sleep(120)
            """
        )
    )
    service = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        pids = [int(p) for p in service.stdout.readline().split()]
        assert len(pids) == 2
    finally:
        service.kill()  # no shutdown code runs
        service.wait(30)
    deadline = time.monotonic() + 20
    alive = pids
    while alive and time.monotonic() < deadline:
        time.sleep(0.2)
        alive = [pid for pid in pids if _running(pid)]
    assert not alive, f"worker processes {alive} outlived the service"


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie has exited; its parent (init after the kill) has not reaped it yet.
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_script_without_a_main_guard_falls_back_to_threads(tmp_path):
    script = tmp_path / "unguarded.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import httpx
            from scqbm.samplers.service import serve_in_background

            with serve_in_background("gibbs", token="{TOKEN}") as server:
                info = httpx.get(server.url + "/v1/info",
                                 headers={{"Authorization": "Bearer {TOKEN}"}}).json()
                print("WORKERS", info["workers"], flush=True)
            """
        )
    )
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "WORKERS threads" in done.stdout
    assert "if __name__ == '__main__':" in done.stderr  # the warning says why


def test_samples_from_processes_come_back_at_the_requested_precision():
    limits = ServiceLimits(workers=1, max_work=10**10, worker_kind="processes")
    with serve_in_background("gibbs", token=TOKEN, limits=limits) as server:
        h, W, _ = problem("bm", 12, seed=1)
        client = RemoteSampler(12, server.url, token=TOKEN, dtype="float64")
        result = client.sample(h.double(), W.double(), 5000)
    assert result.samples.dtype == torch.float64
    assert set(result.samples.unique().tolist()) <= {0.0, 1.0}
