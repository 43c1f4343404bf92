"""Throughput and latency of the sampling service under concurrent clients (loopback).

For 1/4/16/64 concurrent ``remote`` clients (default timeout 60 s, default retries) on
dense 64- and 256-unit problems with 512 reads each, reports requests/s and the p50/p99
latency, plus client timeouts, retries and failures. Run::

    python benchmarks/bench_service.py > benchmarks/results/service.log
"""

from __future__ import annotations

import argparse
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


def problem(n: int, seed: int = 0):
    torch.manual_seed(seed)
    prior = BoltzmannPrior(n, init_scale=0.1)
    return prior.h.detach(), prior.coupling_matrix().detach()


def run(url: str, n: int, clients: int, per_client: int, reads: int) -> dict:
    h, W = problem(n)
    latencies, attempts, failures = [], [], []
    lock = threading.Lock()

    def client():
        sampler = RemoteSampler(n, url, token=TOKEN)  # library defaults: timeout 60 s
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
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reads", type=int, default=512)
    parser.add_argument("--workers", type=int, default=ServiceLimits().workers)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--units", type=int, nargs="+", default=[64, 256])
    args = parser.parse_args()
    torch.set_num_threads(1)
    limits = ServiceLimits(workers=args.workers)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"# scqbm sampling service benchmark: gibbs backend (fresh chains, 101 sweeps per "
        f"read), {args.reads} reads per request, {args.workers} worker threads\n"
        f"# host: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"load average {load:.1f} at start; python {platform.python_version()}, "
        f"torch {torch.__version__}",
        flush=True,
    )
    header = (
        f"{'units':>5} {'clients':>7} {'requests':>8} {'req/s':>7} {'p50 s':>7} {'p99 s':>7} "
        f"{'max s':>7} {'retried':>7} {'failed':>6} {'timeouts':>8}"
    )
    print(header, flush=True)
    with serve_in_background("gibbs", token=TOKEN, limits=limits) as server:
        h, W = problem(8)
        RemoteSampler(8, server.url, token=TOKEN).sample(h, W, 8)  # compile the kernel
        for n in args.units:
            for clients in args.clients:
                # Enough requests per row for a p99 without making the big rows minutes long.
                per_client = max(1, 16 // clients)
                row = run(server.url, n, clients, per_client, args.reads)
                print(
                    f"{row['n']:>5} {row['clients']:>7} {row['requests']:>8} "
                    f"{row['rps']:>7.2f} {row['p50']:>7.2f} {row['p99']:>7.2f} "
                    f"{row['max']:>7.2f} {row['retried']:>7} {row['failed']:>6} "
                    f"{row['timeouts']:>8}"
                    + (f"  {row['first_failure']}" if row["failed"] else ""),
                    flush=True,
                )
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"# load average {load:.1f} at the end", flush=True)


if __name__ == "__main__":
    main()
