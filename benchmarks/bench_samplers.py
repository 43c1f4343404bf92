"""Speed and accuracy of the Boltzmann sampling backends on the same priors.

For dense Boltzmann machines and RBMs of each size, draws the same number of samples with
every available backend, each given the same number of sweeps per sample (parallel tempering:
rounds, each costing ``num_temps`` sweeps), and prints samples per second, spin updates per
second and distances to a reference: a long Gibbs run, which mixes because the couplings are
in the high-temperature phase. The row ``floor`` is a second, independent reference run: its
distances are the noise floor of the table.

    python benchmarks/bench_samplers.py                 # 64, 256 and 1024 units
    python benchmarks/bench_samplers.py --sizes 64 --structures rbm

The couplings imitate a trained prior: fields ~ N(0, 0.5^2), couplings ~ N(0, s^2 / d) with
``d`` the number of neighbours of a unit and ``s = --coupling-scale`` (1 by default), so local
fields stay O(1) at every size. Problems of ``--large`` units or more get ``--large-reads``
reads for every backend (dense 1024-unit sweeps cost ~1 ms per read on one CPU core). On a
machine shared with other jobs, ``--threads 1`` avoids OpenMP threads waiting for a core.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import secrets
import time

import pandas as pd
import torch

from scqbm.samplers import (
    DimodSampler,
    GibbsSampler,
    ParallelTemperingSampler,
    RemoteSampler,
    compare,
    make_sampler,
)


def random_prior(n: int, structure: str, coupling_scale: float, seed: int):
    """Fields, symmetric zero-diagonal couplings and ``n_visible`` of a random prior."""
    generator = torch.Generator().manual_seed(seed)
    h = 0.5 * torch.randn(n, generator=generator)
    if structure == "bm":
        upper = torch.randn(n, n, generator=generator).triu(1) * coupling_scale / math.sqrt(n - 1)
        return h, upper + upper.T, None
    n_visible = n // 2
    B = torch.randn(n_visible, n - n_visible, generator=generator)
    B = B * coupling_scale / math.sqrt(n - n_visible)
    W = torch.zeros(n, n)
    W[:n_visible, n_visible:] = B
    return h, W + W.T, n_visible


def start_service(sweeps: int):
    """A loopback sampling service hosting ``gibbs``, or ``(None, reason)``."""
    missing = [m for m in ("fastapi", "uvicorn", "httpx") if importlib.util.find_spec(m) is None]
    if missing:
        return None, f"remote skipped: {', '.join(missing)} missing (pip install 'scqbm[service]')"
    from scqbm.samplers.service import serve_in_background

    token = secrets.token_urlsafe(16)
    server = serve_in_background("gibbs", {"burn_in": sweeps}, token=token)
    return server, None


def backends(n: int, sweeps: int, seed: int, server, reads: int):
    """The samplers compared, each given ``sweeps`` sweeps (or rounds) per sample."""
    samplers = {
        "gibbs": GibbsSampler(n, burn_in=sweeps, seed=seed, persistent=False),
        # Training's operating point: persistent chains burnt in once, then one sweep per
        # call (a call per training step). At a fixed prior they stay at equilibrium.
        "gibbs_pcd": GibbsSampler(
            n, num_chains=reads, num_sweeps=1, burn_in=sweeps, seed=seed, persistent=True
        ),
        "parallel_tempering": ParallelTemperingSampler(
            n, num_temps=4, beta_min=0.4, burn_in=sweeps, seed=seed, persistent=False
        ),
    }
    notes = []
    if importlib.util.find_spec("dwave.samplers") is not None:
        # dwave-samplers' own schedule (it picks beta_range from the problem).
        samplers["sa_raw"] = DimodSampler(n, seed=seed, num_sweeps=sweeps)
        # A fixed schedule (as a physical annealer's temperature is fixed), then calibrated.
        samplers["sa_calibrated"] = make_sampler(
            "calibrated",
            n,
            backend_kwargs={
                "sampler": "simulated_annealing",
                "seed": seed,
                "num_sweeps": sweeps,
                "beta_range": (0.1, 5.0),
            },
            calibrate_every=0,
            max_iter=4,
            seed=seed,
        )
    else:
        notes.append("dwave-samplers not installed: pip install 'scqbm[dimod]'")
    if server is not None:
        samplers["remote_gibbs"] = RemoteSampler(n, server.url, token=server.token)
    return samplers, notes


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--structures", nargs="+", default=["bm", "rbm"], choices=["bm", "rbm"])
    parser.add_argument("--reads", type=int, default=256, help="samples per backend")
    parser.add_argument("--sweeps", type=int, default=100, help="sweeps per sample")
    parser.add_argument("--ref-reads", type=int, default=1024)
    parser.add_argument("--ref-sweeps", type=int, default=300)
    parser.add_argument("--large", type=int, default=1024, help="size from which to read less")
    parser.add_argument("--large-reads", type=int, default=128)
    parser.add_argument("--large-ref-reads", type=int, default=256)
    parser.add_argument("--coupling-scale", type=float, default=1.0)
    parser.add_argument("--no-remote", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, help="torch threads (default: torch's; 1 on a busy machine)"
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    print(
        f"reads={args.reads} ({args.large_reads} from {args.large} units), sweeps per "
        f"sample={args.sweeps}; reference: Gibbs, {args.ref_reads} chains "
        f"({args.large_ref_reads} from {args.large} units) x {args.ref_sweeps} sweeps; "
        f"torch threads={torch.get_num_threads()}"
    )
    server, reason = (
        (None, "remote skipped: --no-remote") if args.no_remote else start_service(args.sweeps)
    )
    if reason:
        print(reason)
    tables = []
    try:
        for structure in args.structures:
            for n in args.sizes:
                large = n >= args.large
                reads = args.large_reads if large else args.reads
                ref_reads = args.large_ref_reads if large else args.ref_reads
                tables.append(run_problem(structure, n, reads, ref_reads, args, server))
    finally:
        if server is not None:
            server.stop()
    print("\nAll problems")
    print(format_table(pd.concat(tables)))


def run_problem(structure, n, reads, ref_reads, args, server) -> pd.DataFrame:
    h, W, n_visible = random_prior(n, structure, args.coupling_scale, args.seed)
    start = time.perf_counter()
    reference = GibbsSampler(n, burn_in=args.ref_sweeps, seed=args.seed + 1, persistent=False)
    ref_samples = reference.sample(h, W, ref_reads, n_visible=n_visible).samples
    ref_seconds = time.perf_counter() - start
    samplers, notes = backends(n, args.sweeps, args.seed, server, reads)
    # The one-off burn-in of the persistent chains, outside the timed comparison.
    samplers["gibbs_pcd"].sample(h, W, reads, n_visible=n_visible)
    samplers["floor"] = GibbsSampler(
        n, burn_in=args.ref_sweeps, seed=args.seed + 2, persistent=False
    )
    calibration = ""
    if "sa_calibrated" in samplers:
        # Calibrate once, outside the timed comparison (calibrate_every=0).
        start = time.perf_counter()
        info = samplers["sa_calibrated"].sample(h, W, reads, n_visible=n_visible).info
        calibration = (
            f"; SA calibration {time.perf_counter() - start:.1f}s, "
            f"{info['calibration_draws']} draws, beta_eff={info['effective_beta']:.3g}, "
            f"converged={info['calibration_converged']}"
        )
    if server is not None:
        # One untimed request, so the service's first-call set-up is not in the table.
        samplers["remote_gibbs"].sample(h, W, 2, n_visible=n_visible)
    table = compare(samplers, h, W, reads, n_visible, reference=ref_samples)
    table.insert(0, "structure", structure)
    print(f"\n{structure} n={n}, {reads} reads: reference {ref_seconds:.1f}s{calibration}")
    for note in notes:
        print(f"  {note}")
    print(format_table(table), flush=True)
    rates = table["samples_per_s"]
    if "sa_calibrated" in rates:
        print(
            "  speed-up over calibrated dwave SA: "
            + ", ".join(
                f"{name} {rates[name] / rates['sa_calibrated']:.1f}x"
                for name in ("gibbs", "gibbs_pcd")
            )
        )
    return table


def format_table(table: pd.DataFrame) -> str:
    columns = [
        "structure",
        "n_units",
        "samples_per_s",
        "spin_updates_per_s",
        "energy_w1",
        "mean_energy_error",
        "max_marginal_error",
        "max_pairwise_error",
        "effective_beta",
    ]
    return table[columns].to_string(float_format=lambda x: f"{x:.3g}")


if __name__ == "__main__":
    main()
