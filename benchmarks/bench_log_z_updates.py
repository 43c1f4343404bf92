"""Log Z bookkeeping at the default training: throughput against scVI and update accuracy.

Trains scVI and QBMVAE with their defaults (``Model(adata).train()``: scvi-tools' epoch
heuristic, full KL warm-up) on the suite's simulation (4,000 cells x 1,000 genes), each in
its own process with one torch thread, side by side, so both see the same machine. QBMVAE
runs with ``log_z_max_updates`` as given (default: the plan's default; ``0`` is AIS at every
refresh, the behaviour before importance-sampling updates). It prints per model the wall
time of ``train``, cells/s and the ratio to scVI, and for QBMVAE the number of AIS refreshes
and importance-sampling updates of log Z, and the largest gap between an updated log Z and
the next fresh AIS estimate (``log_z_update_error``), and the AIS refreshes that the time
budget deferred (``log_z_refresh_budget``) with the largest drift a logged loss carried.
``--dataset kang`` trains on the Kang IFN-beta PBMCs instead (13,999 cells x 2,000 HVGs, batch
``stim``; ``../shared/data``), the real data of the results page: its 2,000-gene decoder makes
the step costlier for both models. ``--n-latent`` trains a wider QBMVAE (scVI keeps its
defaults unless ``--scvi-n-latent`` gives it the same width: the cost of a wide latent itself,
in the encoder's head and the decoder's first layer, is then on both sides, and the ratio is
what the Boltzmann prior costs).

Usage::

    python benchmarks/bench_log_z_updates.py | tee benchmarks/results/log_z_updates.log
    python benchmarks/bench_log_z_updates.py --max-updates 0 --max-epochs 40
    python benchmarks/bench_log_z_updates.py --n-latent 256 --refresh-budget none
    python benchmarks/bench_log_z_updates.py --n-latent 256 --scvi-n-latent 256
    python benchmarks/bench_log_z_updates.py --dataset kang
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import time
import traceback


def _train(which: str, args: argparse.Namespace, queue) -> None:
    # A failure is sent back, not left to the child's stderr: the parent waits on the queue.
    try:
        queue.put(_fit(which, args))
    except Exception:
        queue.put({"which": which, "error": traceback.format_exc()})


def _fit(which: str, args: argparse.Namespace) -> dict:
    import scvi
    import torch

    import scqbm

    torch.set_num_threads(1)
    adata = _load(args.dataset)
    scvi.settings.seed = 0
    kwargs = {"enable_progress_bar": False, "accelerator": "cpu"}
    if args.max_epochs is not None:
        kwargs["max_epochs"] = args.max_epochs
    if which == "scvi":
        scvi.model.SCVI.setup_anndata(adata, batch_key="batch")
        width = {} if args.scvi_n_latent is None else {"n_latent": args.scvi_n_latent}
        model = scvi.model.SCVI(adata, **width)
    else:
        scqbm.QBMVAE.setup_anndata(adata, batch_key="batch")
        width = {} if args.n_latent is None else {"n_latent": args.n_latent}
        model = scqbm.QBMVAE(adata, **width)
        plan_kwargs = {}
        if args.max_updates is not None:
            plan_kwargs["log_z_max_updates"] = args.max_updates
        if args.refresh_budget != "default":
            budget = None if args.refresh_budget == "none" else float(args.refresh_budget)
            plan_kwargs["log_z_refresh_budget"] = budget
        if plan_kwargs:
            kwargs["plan_kwargs"] = plan_kwargs
    start = time.perf_counter()
    model.train(**kwargs)
    seconds = time.perf_counter() - start
    history = model.history
    epochs = len(history["elbo_train"])
    out = {"which": which, "seconds": seconds, "epochs": epochs}
    # Training cells per second, as the benchmark suite counts them.
    out["cells_per_second"] = len(model.train_indices) * epochs / seconds
    if which != "scvi":
        out["refreshes"] = float(history["log_z_refreshes"].to_numpy().sum())
        out["updates"] = float(history["log_z_updates"].to_numpy().sum())
        error = history.get("log_z_update_error")
        out["max_update_error"] = None if error is None else float(error.max().max())
        out["n_checked"] = 0 if error is None else int(error.notna().sum().sum())
        out["deferred"] = float(history["log_z_deferred"].to_numpy().sum())
        drift = history.get("log_z_deferred_drift")
        out["max_deferred_drift"] = None if drift is None else float(drift.max().max())
        out["final_log_z"] = float(model.module.prior.log_z)
    return out


def _load(dataset: str):
    """The benchmark's data, with ``obs["batch"]`` as the batch key."""
    if dataset == "simulation":
        from scqbm.datasets._simulate import simulate

        return simulate(n_cells=4_000, n_genes=1_000, batch_strength=0.2, seed=0)
    from scqbm.datasets import KANG_BATCH_KEY, KANG_HVG_KEY, kang_ifnb

    adata = kang_ifnb()
    adata = adata[:, adata.var[KANG_HVG_KEY].to_numpy(dtype=bool)].copy()
    adata.obs["batch"] = adata.obs[KANG_BATCH_KEY]
    return adata


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", choices=("simulation", "kang"), default="simulation")
    parser.add_argument("--max-updates", type=int, default=None)
    parser.add_argument("--max-epochs", type=int, default=None)
    parser.add_argument("--n-latent", type=int, default=None, help="QBMVAE's (default: its own)")
    parser.add_argument(
        "--scvi-n-latent", type=int, default=None, help="scVI's (default: its own, 10)"
    )
    parser.add_argument(
        "--refresh-budget", default="default", help="log_z_refresh_budget: a share, or 'none'"
    )
    args = parser.parse_args()
    print(
        f"# {platform.machine()}, {mp.cpu_count()} CPU cores, one torch thread per model, "
        f"data: {args.dataset}"
    )
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_train, args=(w, args, queue)) for w in ("scvi", "qbmvae")]
    for p in procs:
        p.start()
    results = {r["which"]: r for r in (queue.get() for _ in procs)}
    for p in procs:
        p.join()
    failed = [r for r in results.values() if "error" in r]
    if failed:
        raise SystemExit("\n".join(f"{r['which']} failed:\n{r['error']}" for r in failed))
    ratio = results["qbmvae"]["cells_per_second"] / results["scvi"]["cells_per_second"]
    for which in ("scvi", "qbmvae"):
        print(json.dumps(results[which]))
    print(
        f"throughput ratio QBMVAE / scVI: {ratio:.2f}x (n_latent={args.n_latent}, "
        f"scvi_n_latent={args.scvi_n_latent}, "
        f"log_z_max_updates={args.max_updates}, log_z_refresh_budget={args.refresh_budget})"
    )


if __name__ == "__main__":
    main()
