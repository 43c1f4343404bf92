"""QBMVAE trained with Lightning DDP on CPU processes against the single-process runs.

Issue 11's quality check: does ``model.train(accelerator="cpu", devices=2,
strategy="ddp_find_unused_parameters_true")`` give the same latent space as ``model.train()``?
The data, preprocessing and scIB evaluation are the suite's own (``scqbm benchmark
--dataset simulated --training default``), so the DDP run's unscaled scIB Total is directly
comparable with the single-process seeds of that page; they are read from its
``metrics.csv`` (``--reference``) and, with ``--single``, one single-process run is also
trained in this same invocation.

Lightning's DDP launcher re-runs this script once per extra rank (``LOCAL_RANK`` set), so every
rank builds the same data; only rank 0 evaluates and prints.

Usage::

    python benchmarks/bench_ddp.py --devices 2 --seed 0 [--single] [--max-epochs N]

What changes under DDP (same epochs, same per-process batch size 128): each rank sees half of
the cells per epoch, gradients are averaged, so an epoch has half the optimiser steps at twice
the effective batch size. The prior's negative phase uses both ranks' chains (see
``scqbm.train._distributed``).
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import time
import warnings
from pathlib import Path

import numpy as np
import torch

warnings.filterwarnings("ignore")
REFERENCE = Path(__file__).parent / "results" / "simulated_default" / "metrics.csv"


def rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def train(data, seed: int, devices: int, max_epochs: int | None):
    """Exactly the suite's default-regime set-up, plus the DDP arguments when devices > 1."""
    import scvi
    from anndata import AnnData

    from scqbm import QBMVAE
    from scqbm._compat import get_max_epochs_heuristic

    scvi.settings.seed = seed
    adata = data.adata
    work = AnnData(X=adata.layers["counts"].copy(), obs=adata.obs.copy(), var=adata.var.copy())
    QBMVAE.setup_anndata(work, batch_key=data.batch_key)
    model = QBMVAE(work)
    kwargs = {"enable_progress_bar": False, "enable_model_summary": False}
    if max_epochs:
        kwargs["max_epochs"] = max_epochs
    if devices > 1:
        kwargs.update(
            accelerator="cpu", devices=devices, strategy="ddp_find_unused_parameters_true"
        )
    epochs = max_epochs or get_max_epochs_heuristic(work.n_obs)
    start = time.perf_counter()
    model.train(**kwargs)
    seconds = time.perf_counter() - start
    return model, work, epochs, seconds


def evaluate(data, model) -> dict[str, float]:
    import pandas as pd

    from scqbm.benchmark._integration import aggregate_scib, scib_metrics_for_embedding

    embedding = np.asarray(model.get_latent_representation(), dtype=np.float32)
    raw = scib_metrics_for_embedding(data.adata, embedding, data.batch_key, data.label_key)
    rows = [
        {"method": "run", "seed": 0, "metric": k, "metric_type": t, "value": v}
        for k, (t, v) in raw.items()
    ]
    agg = aggregate_scib(pd.DataFrame(rows), min_max_scale=False).iloc[0]
    log_z = model.get_log_partition()
    return {
        "batch": float(agg["Batch correction"]),
        "bio": float(agg["Bio conservation"]),
        "total": float(agg["Total"]),
        "log_z": float(log_z.value),
        "log_z_stderr": float(log_z.stderr),
    }


def reference_totals(path: Path, method: str = "qbmvae_bm") -> dict[str, float]:
    """Unscaled scIB Total per seed of the single-process default-regime page."""
    import pandas as pd

    from scqbm.benchmark._integration import aggregate_scib

    with open(path, newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if r["method"] == method]
    raw = pd.DataFrame([r for r in rows if r["task"] == "scib_raw"])
    if raw.empty:
        return {}
    raw["value"] = raw["value"].astype(float)
    agg = aggregate_scib(raw, min_max_scale=False)
    return {str(s): float(t) for s, t in zip(agg["seed"], agg["Total"], strict=True)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-epochs", type=int, default=None, help="default: scvi's heuristic")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--single", action="store_true", help="also train one process here")
    parser.add_argument("--reference", type=Path, default=REFERENCE)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from scqbm.benchmark._data import load_dataset

    data = load_dataset("simulated")
    results = {}
    for label, devices in [(f"ddp x{args.devices}", args.devices)] + (
        [("single process", 1)] if args.single else []
    ):
        if devices == 1:
            if rank() != 0:
                break  # the extra rank's job ends with the DDP fit
            # Lightning leaves the group initialised; scvi's metrics would sync over it.
            torch.distributed.destroy_process_group()
        model, _, epochs, seconds = train(data, args.seed, devices, args.max_epochs)
        if rank() != 0:
            return
        results[label] = {**evaluate(data, model), "seconds": seconds, "epochs": epochs}

    import scvi

    import scqbm

    print(
        f"scqbm {scqbm.__version__}, scvi-tools {scvi.__version__}, torch {torch.__version__}, "
        f"{os.cpu_count()} CPU cores, torch threads {args.threads} per process"
    )
    print(f"data: {data.description}")
    print(
        f"QBMVAE defaults, seed {args.seed}; DDP: accelerator='cpu', devices={args.devices}, "
        "strategy='ddp_find_unused_parameters_true' (gloo)"
    )
    print(
        f"{'run':<16} {'epochs':>6} {'train s':>8} {'batch':>6} {'bio':>6} {'Total':>6}"
        f" {'log Z':>14}"
    )
    for label, r in results.items():
        print(
            f"{label:<16} {r['epochs']:>6} {r['seconds']:>8.0f} {r['batch']:>6.3f} "
            f"{r['bio']:>6.3f} {r['total']:>6.3f} {r['log_z']:>8.2f} ± {r['log_z_stderr']:.2f}"
        )
    ref = reference_totals(args.reference) if args.reference.exists() else {}
    if ref:
        values = list(ref.values())
        mean = statistics.mean(values)
        sd = statistics.stdev(values) if len(values) > 1 else float("nan")
        print(
            f"single-process seeds from {args.reference}: "
            + ", ".join(f"seed {s} {v:.3f}" for s, v in sorted(ref.items()))
            + f"; mean {mean:.3f} ± {sd:.3f} (sd), range {min(values):.3f}-{max(values):.3f}"
        )
        ddp = results[f"ddp x{args.devices}"]["total"]
        inside = min(values) - sd <= ddp <= max(values) + sd
        print(
            f"DDP Total {ddp:.3f}: {ddp - mean:+.3f} from the single-process mean "
            f"({(ddp - mean) / sd:+.1f} sd); "
            + ("within" if inside else "outside")
            + " the seed range widened by one sd"
        )


if __name__ == "__main__":
    main()
