"""QBMVAE against scVI on the Kang IFN-beta PBMCs, in one run.

Trains scVI and QBMVAE on the same 2,000 HVGs with the same epochs and batch size, then prints
training throughput (cells x epochs / second, the wall time of ``train``) and its ratio, and
the scib-metrics table (Batch correction, Bio conservation, Total) for PCA, scVI and QBMVAE,
without and with min-max scaling. Results are also written as JSON and markdown.

Usage::

    python benchmarks/bench_kang_vs_scvi.py --max-epochs 20 --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import scanpy as sc
import scvi
import torch

import scqbm
from scqbm.datasets import KANG_BATCH_KEY, KANG_HVG_KEY, KANG_LABELS_KEY, kang_ifnb


def parse_args():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--max-epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--qbm-kwargs", type=json.loads, default={}, help="JSON dict for QBMVAE(...)")
    p.add_argument("--max-cells", type=int, help="subsample cells (quick runs)")
    p.add_argument("--skip-scib", action="store_true")
    p.add_argument("--out", default="benchmarks/results", help="folder for JSON/markdown")
    p.add_argument("--name", default="kang_vs_scvi", help="file name (without suffix) of results")
    return p.parse_args()


def load(args):
    adata = kang_ifnb()
    adata = adata[:, adata.var[KANG_HVG_KEY].to_numpy(dtype=bool)].copy()
    if args.max_cells and args.max_cells < adata.n_obs:
        rng = np.random.default_rng(args.seed)
        adata = adata[np.sort(rng.choice(adata.n_obs, args.max_cells, replace=False))].copy()
        sc.pp.filter_genes(adata, min_counts=1)
    adata.layers["counts"] = adata.X.copy()
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    sc.pp.pca(adata, n_comps=50, random_state=args.seed)
    return adata


def train(name, cls, adata, args, **model_kwargs):
    work = adata.copy()
    scvi.settings.seed = args.seed
    cls.setup_anndata(work, layer="counts", batch_key=KANG_BATCH_KEY)
    model = cls(work, **model_kwargs)
    start, start_cpu = time.perf_counter(), time.process_time()
    model.train(max_epochs=args.max_epochs, batch_size=args.batch_size, enable_progress_bar=False)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - start_cpu
    rate = work.n_obs * args.max_epochs / seconds
    # CPU time is the fairer measure when other processes share the cores
    cpu_rate = work.n_obs * args.max_epochs / cpu_seconds
    print(
        f"{name:>8}: {seconds:7.1f} s training ({cpu_seconds:.1f} CPU s), {rate:8.0f} cells/s "
        f"wall, {cpu_rate:8.0f} cells per CPU s",
        flush=True,
    )
    adata.obsm[f"X_{name}"] = model.get_latent_representation()
    return model, seconds, rate, cpu_rate


def scib_table(adata, keys, min_max_scale):
    from scib_metrics.benchmark import BatchCorrection, Benchmarker, BioConservation

    bench = Benchmarker(
        adata,
        batch_key=KANG_BATCH_KEY,
        label_key=KANG_LABELS_KEY,
        embedding_obsm_keys=keys,
        pre_integrated_embedding_obsm_key="X_pca",
        bio_conservation_metrics=BioConservation(),
        batch_correction_metrics=BatchCorrection(),
        n_jobs=2,
    )
    bench.benchmark()
    return bench


def write_markdown(results: dict, path: Path) -> None:
    """The results as a markdown page: command, throughput, and the scIB tables."""
    lines = [
        "# QBMVAE vs scVI on the Kang IFN-beta PBMCs",
        "",
        f"`{results['command']}`" if "command" in results else "",
        "",
        f"{results['n_cells']:,} cells, {results['dataset']}, {results['max_epochs']} epochs, "
        f"batch size {results['batch_size']}, seed {results['seed']}, {results['machine']}; "
        + ", ".join(f"{k} {v}" for k, v in results["versions"].items()),
        "",
        "| | scVI | QBMVAE | ratio |",
        "|---|---|---|---|",
        f"| cells/s (wall) | {results['scvi_cells_per_s']:.0f} | "
        f"{results['qbmvae_cells_per_s']:.0f} | {results['throughput_ratio']:.2f} |",
        f"| cells per CPU second | {results['scvi_cells_per_cpu_s']:.0f} | "
        f"{results['qbmvae_cells_per_cpu_s']:.0f} | {results['throughput_ratio_cpu']:.2f} |",
        "",
        f"Negative-phase sampling: {results['qbmvae_sampler_seconds']:.1f} s of "
        f"{results['qbmvae_seconds']:.1f} s QBMVAE training.",
    ]
    for scale in (False, True):
        key = f"scib_min_max_{scale}"
        if key not in results:
            continue
        lines += ["", f"scib-metrics, min_max_scale={scale}:", ""]
        lines += ["| embedding | Batch correction | Bio conservation | Total |"]
        lines += ["|---|---|---|---|"]
        for name, row in results[key].items():
            lines.append(
                f"| {name} | {row['Batch correction']:.3f} | {row['Bio conservation']:.3f} | "
                f"{row['Total']:.3f} |"
            )
    path.write_text("\n".join(lines) + "\n")


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    adata = load(args)
    print(
        f"Kang IFN-beta PBMCs: {adata.n_obs:,} cells x {adata.n_vars:,} HVGs; "
        f"{args.max_epochs} epochs, batch size {args.batch_size}, seed {args.seed}",
        flush=True,
    )
    _, scvi_s, scvi_rate, scvi_cpu_rate = train("scVI", scvi.model.SCVI, adata, args)
    qbm, qbm_s, qbm_rate, qbm_cpu_rate = train(
        "QBMVAE", scqbm.QBMVAE, adata, args, **args.qbm_kwargs
    )
    ratio = qbm_rate / scvi_rate
    cpu_ratio = qbm_cpu_rate / scvi_cpu_rate
    sampler_s = float(np.nansum(qbm.history["sampler_seconds"].to_numpy(dtype=float)))
    print(
        f"throughput ratio QBMVAE / scVI: {ratio:.2f} wall, {cpu_ratio:.2f} CPU (target >= 0.80); "
        f"sampling {sampler_s:.1f} s = {100 * sampler_s / qbm_s:.1f}% of QBMVAE training"
    )
    results = {
        "command": "python " + " ".join(sys.argv),
        "dataset": "kang_ifnb (2,000 HVGs)",
        "n_cells": int(adata.n_obs),
        "max_epochs": args.max_epochs,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "qbm_kwargs": args.qbm_kwargs,
        "scvi_seconds": scvi_s,
        "qbmvae_seconds": qbm_s,
        "scvi_cells_per_s": scvi_rate,
        "qbmvae_cells_per_s": qbm_rate,
        "throughput_ratio": ratio,
        "scvi_cells_per_cpu_s": scvi_cpu_rate,
        "qbmvae_cells_per_cpu_s": qbm_cpu_rate,
        "throughput_ratio_cpu": cpu_ratio,
        "qbmvae_sampler_seconds": sampler_s,
        "log_z": qbm.get_log_partition().value,
        "machine": f"{platform.processor() or platform.machine()}, torch threads {args.threads}",
        "versions": {
            "scqbm": scqbm.__version__,
            "scvi-tools": scvi.__version__,
            "torch": torch.__version__,
        },
    }
    if not args.skip_scib:
        import scib_metrics

        bench = scib_table(adata, ["X_pca", "X_scVI", "X_QBMVAE"], min_max_scale=False)
        for scale in (False, True):
            table = bench.get_results(min_max_scale=scale)
            cols = ["Batch correction", "Bio conservation", "Total"]
            rows = table.loc[["X_pca", "X_scVI", "X_QBMVAE"], cols].astype(float)
            print(f"\nscib-metrics {scib_metrics.__version__}, min_max_scale={scale}")
            print(rows.round(3).to_string())
            results[f"scib_min_max_{scale}"] = rows.round(4).to_dict(orient="index")
            full = table.drop(index="Metric Type", errors="ignore").astype(float)
            results[f"scib_metrics_min_max_{scale}"] = full.round(4).to_dict(orient="index")
        unscaled = results["scib_min_max_False"]
        print(
            f"\nscIB Total QBMVAE - scVI (no scaling): "
            f"{unscaled['X_QBMVAE']['Total'] - unscaled['X_scVI']['Total']:+.3f}"
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(results, indent=2))
    write_markdown(results, out / f"{args.name}.md")
    print(f"\nwrote {out / args.name}.json and .md")


if __name__ == "__main__":
    main()
