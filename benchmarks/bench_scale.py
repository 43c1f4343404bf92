"""QBMVAE against scVI from 10k to 1M cells: one epoch each, time and peak memory, in one run.

The data are the Kang PBMCs' 2,000 HVGs resampled with noise: every synthetic cell copies a
random Kang cell's counts ``x`` and draws new counts ``NB(mean = s x, dispersion 10)`` with
a log-normal library factor ``s`` per cell (zeros stay zeros), so sparsity, library sizes,
gene-gene structure and the batch column (``stim``) are realistic. Each size is written once
as a sparse CSR ``.h5ad`` (outside the repository, ``--data-dir``).

Every fit (method x size x batch size x in-memory/backed) runs in a fresh subprocess, so its
peak RSS (``ru_maxrss``, including Python, torch and the data it loaded) is its own. Printed:
wall and CPU seconds of the ``train`` call (one epoch, scvi's default 90/10 split), cells/s
(training cells per CPU second: the machine is shared, CPU time is what the fit used),
peak RSS, and QBMVAE/scVI ratios of time (CPU seconds) and memory. Per-epoch cost should be
linear in cells: the last column divides the CPU time per cell by that of the smallest size.

Usage::

    python benchmarks/bench_scale.py --sizes 10000 100000 --batch-sizes 128 1024 \\
        --data-dir /work/runs-issue11 | tee benchmarks/results/scale.log
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

METHODS = ("scvi", "qbmvae")


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 1024])
    p.add_argument(
        "--modes", nargs="+", default=["memory", "backed"], choices=["memory", "backed"]
    )
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--data-dir", default="/work/runs-issue11", help="where the .h5ad files go")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--source", help="AnnData to resample (default: the Kang PBMCs' HVGs)")
    p.add_argument(
        "--qbm-kwargs", type=json.loads, default={}, help="JSON dict of QBMVAE arguments"
    )
    # Internal: run one fit in this process and print its result as JSON.
    p.add_argument("--fit", nargs=4, metavar=("METHOD", "PATH", "BATCH_SIZE", "MODE"))
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------ data
def resample_counts(source, n_cells: int, seed: int, chunk: int = 100_000):
    """``n_cells`` noisy copies of random cells of ``source`` (CSR counts), as float32 CSR."""
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    X = sp.csr_matrix(source.X).astype(np.float32)
    picks, blocks = [], []
    for start in range(0, n_cells, chunk):
        idx = rng.integers(0, source.n_obs, size=min(chunk, n_cells - start))
        block = X[idx]
        factor = rng.lognormal(0.0, 0.3, size=len(idx)).astype(np.float32)
        mean = block.data * np.repeat(factor, np.diff(block.indptr))
        theta = 10.0
        block.data = rng.poisson(rng.gamma(theta, mean / theta)).astype(np.float32)
        block.eliminate_zeros()
        picks.append(idx)
        blocks.append(block)
    X = sp.vstack(blocks, format="csr")
    # Models refuse genes and cells without counts: give each such gene (cell) one count in
    # a random cell (gene), rather than change the number of genes or cells.
    fix_genes = np.flatnonzero(np.asarray(X.sum(0)).ravel() == 0)
    fix_cells = np.flatnonzero(np.asarray(X.sum(1)).ravel() == 0)
    extra = sp.csr_matrix(
        (
            np.ones(len(fix_genes) + len(fix_cells), dtype=np.float32),
            (
                np.concatenate([rng.integers(0, n_cells, len(fix_genes)), fix_cells]),
                np.concatenate([fix_genes, rng.integers(0, X.shape[1], len(fix_cells))]),
            ),
        ),
        shape=X.shape,
    )
    return (X + extra).tocsr(), np.concatenate(picks)


def make_dataset(path: Path, n_cells: int, seed: int, source_path: str | None = None):
    """Write the resampled data set of ``n_cells`` cells to ``path`` (skipped if present)."""
    import anndata as ad
    import pandas as pd

    if path.exists():
        return
    if source_path is None:
        from scqbm.datasets import KANG_HVG_KEY, kang_ifnb

        source = kang_ifnb()
        source = source[:, source.var[KANG_HVG_KEY].to_numpy(dtype=bool)].copy()
    else:
        source = ad.read_h5ad(source_path)
    X, picks = resample_counts(source, n_cells, seed)
    obs = pd.DataFrame(
        {"stim": source.obs["stim"].to_numpy()[picks]},
        index=pd.Index([f"cell{i}" for i in range(n_cells)]),
    )
    obs["stim"] = obs["stim"].astype("category")
    adata = ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=source.var_names.copy()))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.h5ad")
    adata.write_h5ad(tmp)
    tmp.rename(path)


# ------------------------------------------------------------------------------------- fit
def peak_rss_mb() -> float:
    # VmHWM belongs to this process's memory map. ru_maxrss survives exec on Linux: a fit
    # started by a parent that had just built a 1M-cell dataset reported the parent's peak.
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def fit_once(method: str, path: str, batch_size: int, mode: str, args) -> dict:
    """Train ``method`` for one epoch on ``path`` in this process; return the measurements."""
    import anndata as ad
    import scvi
    import torch

    torch.set_num_threads(args.threads)
    scvi.settings.seed = args.seed
    adata = ad.read_h5ad(path, backed="r" if mode == "backed" else None)
    if method == "scvi":
        cls, kwargs = scvi.model.SCVI, {}
    else:
        import scqbm

        cls, kwargs = scqbm.QBMVAE, dict(args.qbm_kwargs)
    cls.setup_anndata(adata, batch_key="stim")
    model = cls(adata, **kwargs)
    start, start_cpu = time.perf_counter(), time.process_time()
    model.train(max_epochs=1, batch_size=batch_size, enable_progress_bar=False)
    wall, cpu = time.perf_counter() - start, time.process_time() - start_cpu
    n_train = len(model.train_indices)
    return {
        "method": method,
        "n_cells": adata.n_obs,
        "n_train": n_train,
        "batch_size": batch_size,
        "mode": mode,
        "wall_s": wall,
        "cpu_s": cpu,
        "cells_per_cpu_s": n_train / cpu,
        "peak_rss_mb": peak_rss_mb(),
    }


def run_fit(method, path, batch_size, mode, args) -> dict:
    """One fit in a fresh subprocess (its own peak RSS); the result, or the error text."""
    cmd = [
        sys.executable,
        __file__,
        "--fit",
        method,
        str(path),
        str(batch_size),
        mode,
        "--threads",
        str(args.threads),
        "--seed",
        str(args.seed),
        "--qbm-kwargs",
        json.dumps(args.qbm_kwargs),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    return {"error": lines[-1] if lines else f"exit code {proc.returncode}"}


def main(argv=None):
    args = parse_args(argv)
    if args.fit:
        method, path, batch_size, mode = args.fit
        result = fit_once(method, path, int(batch_size), mode, args)
        print(json.dumps(result), flush=True)
        return
    import anndata
    import scvi
    import torch

    import scqbm

    print(
        f"scqbm {scqbm.__version__}, scvi-tools {scvi.__version__}, torch {torch.__version__}, "
        f"anndata {anndata.__version__}, {platform.machine()}, threads {args.threads}; "
        "one epoch per fit, each fit in a fresh process",
        flush=True,
    )
    data_dir = Path(args.data_dir)
    header = (
        f"{'cells':>9} {'batch':>5} {'mode':>6} {'method':>6} {'wall s':>8} {'CPU s':>8} "
        f"{'cells/CPU s':>11} {'peak RSS MB':>11} {'CPU/cell vs smallest':>20}"
    )
    print(header, flush=True)
    per_cell: dict[tuple, float] = {}
    for n in args.sizes:
        path = data_dir / f"kang_resampled_{n}.h5ad"
        start = time.perf_counter()
        make_dataset(path, n, args.seed, args.source)
        if time.perf_counter() - start > 1:
            print(f"(wrote {path} in {time.perf_counter() - start:.0f} s)", flush=True)
        for batch_size in args.batch_sizes:
            for mode in args.modes:
                results = {}
                for method in args.methods:
                    res = run_fit(method, path, batch_size, mode, args)
                    results[method] = res
                    if "error" in res:
                        print(
                            f"{n:>9} {batch_size:>5} {mode:>6} {method:>6} failed: {res['error']}",
                            flush=True,
                        )
                        continue
                    key = (method, batch_size, mode)
                    cost = res["cpu_s"] / res["n_train"]
                    per_cell.setdefault(key, cost)
                    print(
                        f"{n:>9} {batch_size:>5} {mode:>6} {method:>6} {res['wall_s']:>8.1f} "
                        f"{res['cpu_s']:>8.1f} {res['cells_per_cpu_s']:>11.0f} "
                        f"{res['peak_rss_mb']:>11.0f} {cost / per_cell[key]:>20.2f}",
                        flush=True,
                    )
                ok = [m for m in METHODS if m in results and "error" not in results[m]]
                if len(ok) == 2:
                    q, s = results["qbmvae"], results["scvi"]
                    print(
                        f"{'':>9} {'':>5} {'':>6} {'ratio':>6} QBMVAE/scVI: time "
                        f"{q['cpu_s'] / s['cpu_s']:.2f}x (CPU), {q['wall_s'] / s['wall_s']:.2f}x "
                        f"(wall), peak RSS {q['peak_rss_mb'] / s['peak_rss_mb']:.2f}x",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
