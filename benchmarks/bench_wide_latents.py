"""Wide binary latents: sampling cost and throughput of QBMVAE against scVI, in one run.

For each ``n_latent`` and prior structure (dense ``bm``, bipartite ``rbm``) it trains QBMVAE
for one epoch on the Kang PBMCs (2,000 HVGs, raw counts) and times every training step and
every negative-phase sampler call, next to one scVI epoch on the same cells. It prints

All times are CPU seconds of the benchmark process (one torch thread), so that other
processes on a shared machine do not inflate them; ``train`` also prints its wall time.

* step: median time of a training step (the first steps, which burn the chains in,
  are left out), and cells/s = batch size / step;
* sampling: median time of the sampler call inside a step, and its share of the step;
* log Z: seconds spent refreshing log Z (AIS beyond 20 dense units) during ``train``, and
  the number of refreshes; the precise final estimate at the end of ``train`` is skipped
  unless ``--final-log-z`` (it is a one-off cost, not a per-epoch one);
* train cells/s: cells / wall time of the whole ``train`` call (includes log Z and burn-in);
* ratio: QBMVAE cells/s over scVI's (steady-state steps and whole ``train`` call).

It also times one dense Gibbs sweep of 512 chains with each scheme of
:func:`scqbm.prior.dense_gibbs_sweep` (``blocked``, the default, and ``single_site``).

Usage::

    python benchmarks/bench_wide_latents.py --threads 1 | tee benchmarks/results/wide_latents.log
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import numpy as np
import scanpy as sc
import scvi
import torch
from lightning.pytorch.callbacks import Callback

import scqbm
from scqbm.datasets import KANG_BATCH_KEY, KANG_HVG_KEY, kang_ifnb
from scqbm.prior import dense_gibbs_sweep

# CPU time of this process: on a shared machine, wall times measure the neighbours too. With
# one torch thread (and numba's kernels in the same thread) it is the compute that was done.
CLOCK = time.process_time
SKIP = 3  # first steps left out of the medians (chain burn-in, allocator warm-up)


def parse_args():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--n-latent", type=int, nargs="+", default=[32, 128, 256, 512, 1024])
    p.add_argument("--priors", nargs="+", default=["bm", "rbm"], choices=["bm", "rbm"])
    p.add_argument("--cells", type=int, default=4096, help="cells resampled from Kang")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--num-chains", type=int, help="negative-phase chains (default: sampler's)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-sweeps", action="store_true", help="skip the sweep micro-benchmark")
    p.add_argument(
        "--final-log-z",
        action="store_true",
        help="keep the precise log Z estimate at the end of training (AIS with 1,024 chains "
        "and 1,000 temperatures: minutes for a dense 1,024-unit prior on one core)",
    )
    return p.parse_args()


class StepTimer(Callback):
    """Wall time of every training batch (forward, sampling, backward, optimizer step)."""

    def __init__(self):
        self.seconds: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._start = CLOCK()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seconds.append(CLOCK() - self._start)


def _timed(obj, name: str, store: list[float]) -> None:
    """Wrap ``obj.name`` so that each call's wall time is appended to ``store``."""
    original = getattr(obj, name)

    def wrapper(*args, **kwargs):
        start = CLOCK()
        try:
            return original(*args, **kwargs)
        finally:
            store.append(CLOCK() - start)

    setattr(obj, name, wrapper)


def load(n_cells: int, seed: int):
    adata = kang_ifnb()
    adata = adata[:, adata.var[KANG_HVG_KEY].to_numpy(dtype=bool)]
    rng = np.random.default_rng(seed)
    idx = rng.choice(adata.n_obs, n_cells, replace=n_cells > adata.n_obs)
    adata = adata[np.sort(idx)].copy()
    adata.obs_names_make_unique()
    sc.pp.filter_genes(adata, min_counts=1)
    return adata


def fit(cls, adata, args, **kwargs) -> dict:
    work = adata.copy()
    scvi.settings.seed = args.seed
    cls.setup_anndata(work, batch_key=KANG_BATCH_KEY)
    model = cls(work, **kwargs)
    sample_s: list[float] = []
    log_z_s: list[float] = []
    module = model.module
    if hasattr(module, "sampler"):
        _timed(module.sampler, "sample", sample_s)
        # Whichever object owns the log Z refresh on this version of the package.
        for owner, name in ((module, "refresh_log_partition"), (module.prior, "refresh")):
            if hasattr(owner, name):
                _timed(owner, name, log_z_s)
    timer = StepTimer()
    start, start_cpu = time.perf_counter(), CLOCK()
    model.train(
        max_epochs=1,
        batch_size=args.batch_size,
        enable_progress_bar=False,
        callbacks=[timer],
    )
    wall, cpu = time.perf_counter() - start, CLOCK() - start_cpu
    steps = timer.seconds[SKIP:] or timer.seconds
    step = statistics.median(steps)
    samp = statistics.median(sample_s[SKIP:] or sample_s) if sample_s else 0.0
    n_train = len(timer.seconds) * args.batch_size  # approximately (last batch may be short)
    return {
        "step_ms": 1e3 * step,
        "sample_ms": 1e3 * samp,
        "share": samp / step,
        "cells_per_s": args.batch_size / step,
        "train_s": cpu,
        "train_wall_s": wall,
        "train_cells_per_s": n_train / cpu,
        "log_z_s": sum(log_z_s),
        "log_z_n": len(log_z_s),
        "steps": len(timer.seconds),
    }


def sweep_table(sizes, n_chains=512, repeats=5):
    print(f"\nDense Gibbs sweep, {n_chains} chains (CPU ms per sweep, median of {repeats}):")
    print(f"{'n':>6} {'blocked':>9} {'single_site':>12} {'speed-up':>9} {'spin updates/s':>15}")
    gen = torch.Generator().manual_seed(0)
    for n in sizes:
        W = torch.randn(n, n, generator=gen) * (0.5 / n**0.5)
        W = (W + W.T) / 2
        W.fill_diagonal_(0.0)
        h = 0.1 * torch.randn(n, generator=gen)
        z = torch.randint(0, 2, (n_chains, n), generator=gen).float()
        times = {}
        for scheme in ("blocked", "single_site"):
            dense_gibbs_sweep(z, h, W, scheme=scheme)
            runs = []
            for _ in range(repeats):
                start = CLOCK()
                dense_gibbs_sweep(z, h, W, scheme=scheme)
                runs.append(CLOCK() - start)
            times[scheme] = statistics.median(runs)
        rate = n_chains * n / times["blocked"]
        print(
            f"{n:>6} {1e3 * times['blocked']:>9.1f} {1e3 * times['single_site']:>12.1f} "
            f"{times['single_site'] / times['blocked']:>8.1f}x {rate:>15.3g}",
            flush=True,
        )


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"scqbm {scqbm.__version__}, scvi-tools {scvi.__version__}, torch {torch.__version__}, "
        f"{platform.processor() or platform.machine()}, threads {args.threads}, "
        f"{args.cells} cells x 2,000 genes, batch size {args.batch_size}, one epoch each",
        flush=True,
    )
    if not args.skip_sweeps:
        sweep_table(args.n_latent)
    if not args.final_log_z:
        from scqbm.train import QBMTrainingPlan

        QBMTrainingPlan.on_train_end = lambda self: None
    adata = load(args.cells, args.seed)
    ref = fit(scvi.model.SCVI, adata, args)
    print(
        f"\nscVI (n_latent 10): step {ref['step_ms']:.1f} ms, {ref['cells_per_s']:.0f} cells/s "
        f"steady, train {ref['train_s']:.1f} CPU s ({ref['train_cells_per_s']:.0f} cells/s, "
        f"wall {ref['train_wall_s']:.1f} s)",
        flush=True,
    )
    header = (
        f"{'prior':>5} {'n_latent':>8} {'step ms':>8} {'sample ms':>9} {'share':>6} "
        f"{'cells/s':>8} {'ratio':>6} {'log Z s (n)':>12} {'train s':>8} {'train ratio':>11}"
    )
    print("\n" + header)
    sampler_kwargs = {"num_chains": args.num_chains} if args.num_chains else None
    for prior in args.priors:
        for n in args.n_latent:
            res = fit(
                scqbm.QBMVAE, adata, args, n_latent=n, prior=prior, sampler_kwargs=sampler_kwargs
            )
            print(
                f"{prior:>5} {n:>8} {res['step_ms']:>8.1f} {res['sample_ms']:>9.1f} "
                f"{100 * res['share']:>5.0f}% {res['cells_per_s']:>8.0f} "
                f"{res['cells_per_s'] / ref['cells_per_s']:>6.2f} "
                f"{res['log_z_s']:>8.1f} ({res['log_z_n']}) "
                f"{res['train_s']:>8.1f} "
                f"{res['train_cells_per_s'] / ref['train_cells_per_s']:>11.2f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
