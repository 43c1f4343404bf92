"""Throughput and latency of the sampling service under concurrent clients (loopback).

For 1/4/16/64 concurrent ``remote`` clients (default timeout 60 s, default retries) on
dense 64- and 256-unit problems with 512 reads each, reports requests/s and the p50/p99
latency, plus client timeouts, retries and failures. Two targets of issue 10 are checked
explicitly and reported on their own lines:

* at 64 clients on a 256-unit, 512-read problem, no request times out at the client's
  default timeout (no failure and no retry: a retry would hide a timed-out attempt);
* a small request waits at most one small request's time behind big ones (every worker busy
  with a big request that takes seconds), with the default workers and again with one
  worker, where the sampling threads (worker + express) do not outnumber two cores.

Run::

    OMP_NUM_THREADS=1 python benchmarks/bench_service.py > benchmarks/results/service.log
"""

from __future__ import annotations

import argparse
import inspect
import os
import platform
import threading
import time

import numpy as np
import torch

from scqbm.prior import BoltzmannPrior
from scqbm.samplers import RemoteSampler, SamplerError
from scqbm.samplers.service import ServiceLimits, serve_in_background

TOKEN = "bench-token"
#: The ``remote`` client's defaults, which the clients here use.
CLIENT_DEFAULTS = {
    name: p.default
    for name, p in inspect.signature(RemoteSampler).parameters.items()
    if name in ("timeout", "max_retries")
}


def problem(n: int, seed: int = 0):
    torch.manual_seed(seed)
    prior = BoltzmannPrior(n, init_scale=0.1)
    return prior.h.detach(), prior.coupling_matrix().detach()


class CountingRemote(RemoteSampler):
    """The ``remote`` client with its defaults, recording why each retried attempt failed."""

    def __init__(self, *args, reasons: list, **kwargs):
        super().__init__(*args, **kwargs)
        self._reasons = reasons

    def _delay(self, attempt, response=None):
        # Called once per failed attempt that is retried, with the response if there was one.
        if response is None:
            self._reasons.append("no answer (connection error or client timeout)")
        else:
            self._reasons.append(f"HTTP {response.status_code}")
        return super()._delay(attempt, response)


def run(url: str, n: int, clients: int, per_client: int, reads: int) -> dict:
    h, W = problem(n)
    latencies, attempts, failures, reasons = [], [], [], []
    lock = threading.Lock()

    def client():
        # Library defaults: timeout 60 s, 3 retries.
        sampler = CountingRemote(n, url, token=TOKEN, reasons=reasons)
        for _ in range(per_client):
            start = time.perf_counter()
            try:
                result = sampler.sample(h, W, reads)
            except SamplerError as err:
                with lock:
                    failures.append(str(err)[:120])
                continue
            with lock:
                latencies.append(time.perf_counter() - start)
                attempts.append(result.info["attempts"])
        sampler.close()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    lat = np.array(latencies) if latencies else np.array([np.nan])
    return {
        "n": n,
        "clients": clients,
        "requests": clients * per_client,
        "rps": len(latencies) / wall,
        "p50": float(np.percentile(lat, 50)),
        "p99": float(np.percentile(lat, 99)),
        "max": float(lat.max()),
        "retried": sum(a > 1 for a in attempts),
        "failed": len(failures),
        "timeouts": sum("Timeout" in f for f in failures),
        "first_failure": failures[0] if failures else "",
        "retry_reasons": {r: reasons.count(r) for r in sorted(set(reasons))},
    }


def fairness(url: str, workers: int, big_reads: int, repeats: int = 5) -> dict:
    """Latency of a small request alone and behind ``workers`` big ones (all workers busy)."""
    small_n, small_reads, big_n = 64, 64, 256
    hs, Ws = problem(small_n, seed=1)
    hb, Wb = problem(big_n, seed=2)
    small = RemoteSampler(small_n, url, token=TOKEN)

    def timed_small() -> tuple[float, float]:
        start = time.perf_counter()
        info = small.sample(hs, Ws, small_reads).info
        # The service's own account of the wait for a free worker (no CPU contention in it).
        return time.perf_counter() - start, float(info.get("queue_seconds", float("nan")))

    timed_small()  # warm: the backend instance of this size on a worker
    alone, _ = zip(*[timed_small() for _ in range(repeats)], strict=True)
    big_seconds: list[float] = []

    def big():
        sampler = RemoteSampler(big_n, url, token=TOKEN)
        start = time.perf_counter()
        sampler.sample(hb, Wb, big_reads)
        big_seconds.append(time.perf_counter() - start)
        sampler.close()

    threads = [threading.Thread(target=big) for _ in range(workers)]
    for thread in threads:
        thread.start()
    time.sleep(0.5)  # every worker is busy with a big request now
    behind, queued = zip(*[timed_small() for _ in range(repeats)], strict=True)
    still_running = sum(thread.is_alive() for thread in threads)
    for thread in threads:
        thread.join()
    small.close()
    return {
        "small": f"{small_n} units x {small_reads} reads",
        "big": f"{workers} x ({big_n} units x {big_reads} reads)",
        "alone_p50": float(np.median(alone)),
        "behind_p50": float(np.median(behind)),
        "behind_max": float(np.max(behind)),
        "queued_p50": float(np.median(queued)),
        "queued_max": float(np.max(queued)),
        "big_seconds": float(np.max(big_seconds)),
        "big_running_after": still_running,
    }


def report_fairness(fair: dict, workers: int) -> None:
    extra = fair["behind_max"] - fair["alone_p50"]
    small_time = fair["alone_p50"]
    print(
        f"# target 2 ({workers} worker{'s' if workers > 1 else ''} + express): small request "
        f"({fair['small']}) alone p50 {small_time:.3f} s; behind {fair['big']} (each "
        f"{fair['big_seconds']:.1f} s, {fair['big_running_after']} still running after the "
        f"small ones): latency p50 {fair['behind_p50']:.3f} s, max {fair['behind_max']:.3f} s "
        f"(extra {extra:.3f} s = {extra / small_time:.2f} small requests, CPU sharing with the "
        f"big requests included); wait for a worker (server queue_seconds) p50 "
        f"{fair['queued_p50']:.3f} s, max {fair['queued_max']:.3f} s = "
        f"{fair['queued_max'] / small_time:.2f} small requests -> "
        f"{'MET' if fair['queued_max'] <= small_time else 'NOT MET'} (wait), "
        f"{'MET' if extra <= small_time else 'NOT MET'} (latency)",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reads", type=int, default=512)
    parser.add_argument("--workers", type=int, default=ServiceLimits().workers)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--units", type=int, nargs="+", default=[64, 256])
    parser.add_argument(
        "--big-reads",
        type=int,
        default=1024,
        help="Reads of each big request of the fairness check (256 units; capped by max_work).",
    )
    parser.add_argument(
        "--worker-kind",
        nargs="+",
        default=[ServiceLimits().worker_kind],
        choices=["auto", "processes", "threads"],
        help="Worker kinds to measure; the fairness check runs once per kind, in this run.",
    )
    parser.add_argument(
        "--fairness-only", action="store_true", help="Skip the client table (target 2 only)."
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    limits = ServiceLimits(workers=args.workers, worker_kind=args.worker_kind[0])
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"# scqbm sampling service benchmark: gibbs backend (fresh chains, 101 sweeps per "
        f"read), {args.reads} reads per request, {args.workers} workers "
        f"(worker_kind {', '.join(args.worker_kind)})\n"
        f"# client: RemoteSampler defaults, timeout {CLIENT_DEFAULTS['timeout']:g} s, "
        f"max_retries {CLIENT_DEFAULTS['max_retries']}; service: deadline "
        f"{limits.deadline_seconds:g} s, max_queue {limits.max_queue}, max_work "
        f"{limits.max_work}\n"
        f"# host: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"load average {load:.1f} at start; OMP_NUM_THREADS="
        f"{os.environ.get('OMP_NUM_THREADS', 'unset')}; python {platform.python_version()}, "
        f"torch {torch.__version__}",
        flush=True,
    )
    header = (
        f"{'units':>5} {'clients':>7} {'requests':>8} {'req/s':>7} {'p50 s':>7} {'p99 s':>7} "
        f"{'max s':>7} {'retried':>7} {'failed':>6} {'timeouts':>8}"
    )
    print(header, flush=True)
    rows = []
    with serve_in_background("gibbs", token=TOKEN, limits=limits) as server:
        h, W = problem(8)
        RemoteSampler(8, server.url, token=TOKEN).sample(h, W, 8)  # compile the kernel
        for n in [] if args.fairness_only else args.units:
            for clients in args.clients:
                # Enough requests per row for a p99 without making the big rows minutes long.
                per_client = max(1, 16 // clients)
                row = run(server.url, n, clients, per_client, args.reads)
                rows.append(row)
                print(
                    f"{row['n']:>5} {row['clients']:>7} {row['requests']:>8} "
                    f"{row['rps']:>7.2f} {row['p50']:>7.2f} {row['p99']:>7.2f} "
                    f"{row['max']:>7.2f} {row['retried']:>7} {row['failed']:>6} "
                    f"{row['timeouts']:>8}"
                    + (f"  {row['first_failure']}" if row["failed"] else "")
                    + (f"  retried attempts: {row['retry_reasons']}" if row["retried"] else ""),
                    flush=True,
                )
        target = next((r for r in rows if r["n"] == 256 and r["clients"] == 64), None)
        if target is not None and args.reads == 512:
            timed_out = target["timeouts"] + target["retried"]
            met = timed_out == 0 and not target["failed"]
            print(
                f"# target 1: 64 clients, 256 units, 512 reads, client timeout "
                f"{CLIENT_DEFAULTS['timeout']:g} s: {target['requests']} requests, "
                f"{target['failed']} failed, {target['retried']} retried, {target['timeouts']} "
                f"client timeouts; p50 {target['p50']:.2f} s, p99 {target['p99']:.2f} s, max "
                f"{target['max']:.2f} s -> {'MET' if met else 'NOT MET'}; failed attempts "
                f"that were retried: {target['retry_reasons'] or 'none'}",
                flush=True,
            )
    # The largest big request the default budget admits (units x reads x 101 sweeps).
    big_reads = min(args.big_reads, limits.max_work // (256 * 101))
    for kind in args.worker_kind:
        for workers in sorted({args.workers, 1}, reverse=True):
            # With fewer workers than cores (1 worker + the express thread on 2 cores), the
            # small request's latency shows the scheduling alone, not CPU oversubscription.
            each = ServiceLimits(workers=workers, worker_kind=kind)
            with serve_in_background("gibbs", token=TOKEN, limits=each) as server:
                served = server.app.state.pool.worker_kind
                print(f"# worker_kind={kind!r}: workers sample in {served}", flush=True)
                report_fairness(fairness(server.url, workers, big_reads), workers)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"# load average {load:.1f} at the end", flush=True)


if __name__ == "__main__":
    main()
