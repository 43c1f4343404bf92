"""Label transfer to a held-out condition on Kang: QBMSCANVI vs scANVI.

Kang IFN-beta PBMCs, 2,000 HVGs. Cells of the control condition (``stim == "CTRL"``) keep
their ``cell_type_derived`` label, stimulated cells (``"STIM"``) are unlabelled. Each method
is the scvi-tools two-step workflow: an unsupervised model (scVI / QBMVAE, ``batch_key="stim"``)
for ``--epochs`` epochs, then the semi-supervised one initialised from it
(``SCANVI.from_scvi_model`` / ``QBMSCANVI.from_qbmvae_model``) for ``--semi-epochs`` epochs.
Reported: accuracy, weighted and macro F1 of the predictions for the STIM cells against their
held-out ``cell_type_derived``, the same on the labelled CTRL cells, wall times, and the
ratios QBMSCANVI / scANVI, all from one run.

Usage::

    python benchmarks/bench_label_transfer.py --epochs 20 --semi-epochs 10 --threads 1
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import scvi
import torch
from sklearn.metrics import accuracy_score, f1_score

import scqbm
from scqbm.datasets import KANG_BATCH_KEY, KANG_HVG_KEY, kang_ifnb

LABEL_KEY = "cell_type_derived"
UNLABELED = "Unknown"
HELD_OUT = "STIM"


def parse_args():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--epochs", type=int, default=20, help="unsupervised epochs (scVI, QBMVAE)")
    p.add_argument("--semi-epochs", type=int, default=10, help="scANVI / QBMSCANVI epochs")
    p.add_argument("--n-cells", type=int, help="subsample this many cells (quick runs)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--out", help="folder for label_transfer.json / .md (optional)")
    return p.parse_args()


def load(args):
    adata = kang_ifnb()
    adata = adata[:, adata.var[KANG_HVG_KEY].to_numpy(dtype=bool)].copy()
    if args.n_cells and args.n_cells < adata.n_obs:
        rng = np.random.default_rng(args.seed)
        adata = adata[np.sort(rng.choice(adata.n_obs, args.n_cells, replace=False))].copy()
    # A subsample can leave genes without counts, which QBMVAE refuses today.
    adata = adata[:, np.asarray(adata.X.sum(0)).ravel() > 0].copy()
    labels = adata.obs[LABEL_KEY].astype(str).to_numpy().copy()
    labels[adata.obs[KANG_BATCH_KEY].astype(str).to_numpy() == HELD_OUT] = UNLABELED
    adata.obs["transfer_labels"] = labels
    return adata


def scores(truth, predicted) -> dict:
    return {
        "accuracy": float(accuracy_score(truth, predicted)),
        "f1_weighted": float(f1_score(truth, predicted, average="weighted")),
        "f1_macro": float(f1_score(truth, predicted, average="macro")),
    }


def run(name, base_cls, semi_init, adata, args) -> dict:
    work = adata.copy()
    scvi.settings.seed = args.seed
    base_cls.setup_anndata(work, batch_key=KANG_BATCH_KEY)
    base = base_cls(work)
    start = time.perf_counter()
    base.train(max_epochs=args.epochs, batch_size=args.batch_size, enable_progress_bar=False)
    base_s = time.perf_counter() - start
    semi = semi_init(base, unlabeled_category=UNLABELED, labels_key="transfer_labels")
    start = time.perf_counter()
    semi.train(max_epochs=args.semi_epochs, batch_size=args.batch_size, enable_progress_bar=False)
    semi_s = time.perf_counter() - start
    predicted = np.asarray(semi.predict())
    truth = work.obs[LABEL_KEY].astype(str).to_numpy()
    held_out = work.obs[KANG_BATCH_KEY].astype(str).to_numpy() == HELD_OUT
    row = {
        "held_out": scores(truth[held_out], predicted[held_out]),
        "labelled": scores(truth[~held_out], predicted[~held_out]),
        "unsupervised_seconds": base_s,
        "semisupervised_seconds": semi_s,
    }
    print(
        f"{name:>9}: STIM accuracy {row['held_out']['accuracy']:.3f}, weighted F1 "
        f"{row['held_out']['f1_weighted']:.3f}, macro F1 {row['held_out']['f1_macro']:.3f} | "
        f"CTRL accuracy {row['labelled']['accuracy']:.3f} | training {base_s:.0f} s + "
        f"{semi_s:.0f} s",
        flush=True,
    )
    return row


def write(results: dict, args, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "label_transfer.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = [
        "# Label transfer to a held-out condition (Kang IFN-beta PBMCs)",
        "",
        f"{results['n_cells']:,} cells x {results['n_genes']:,} HVGs; labels "
        f"`{LABEL_KEY}` on CTRL cells, STIM cells unlabelled and predicted; "
        f"{args.epochs} unsupervised + {args.semi_epochs} semi-supervised epochs, seed "
        f"{args.seed}, {args.threads} thread(s). Command: `python "
        "benchmarks/bench_label_transfer.py "
        f"--epochs {args.epochs} --semi-epochs {args.semi_epochs}"
        + (f" --n-cells {args.n_cells}" if args.n_cells else "")
        + f" --seed {args.seed} --threads {args.threads}`.",
        "",
        "| method | STIM accuracy | STIM weighted F1 | STIM macro F1 | CTRL accuracy | "
        "training (s) |",
        "|---|---|---|---|---|---|",
    ]
    for name in ("scANVI", "QBMSCANVI"):
        row = results[name]
        lines.append(
            f"| {name} | {row['held_out']['accuracy']:.3f} | {row['held_out']['f1_weighted']:.3f}"
            f" | {row['held_out']['f1_macro']:.3f} | {row['labelled']['accuracy']:.3f} | "
            f"{row['unsupervised_seconds']:.0f} + {row['semisupervised_seconds']:.0f} |"
        )
    ratios = results["ratio_qbmscanvi_over_scanvi"]
    lines += [
        "",
        f"Ratio QBMSCANVI / scANVI: accuracy {ratios['accuracy']:.3f}, weighted F1 "
        f"{ratios['f1_weighted']:.3f}.",
    ]
    (out / "label_transfer.md").write_text("\n".join(lines) + "\n")


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    adata = load(args)
    n_held_out = int((adata.obs[KANG_BATCH_KEY].astype(str) == HELD_OUT).sum())
    print(
        f"Kang IFN-beta PBMCs: {adata.n_obs:,} cells x {adata.n_vars:,} HVGs, {n_held_out:,} "
        f"{HELD_OUT} cells unlabelled; {args.epochs} + {args.semi_epochs} epochs, batch size "
        f"{args.batch_size}, seed {args.seed}, {args.threads} thread(s)",
        flush=True,
    )
    start = time.perf_counter()
    results = {
        "n_cells": adata.n_obs,
        "n_genes": adata.n_vars,
        "scANVI": run("scANVI", scvi.model.SCVI, scvi.model.SCANVI.from_scvi_model, adata, args),
        "QBMSCANVI": run(
            "QBMSCANVI", scqbm.QBMVAE, scqbm.QBMSCANVI.from_qbmvae_model, adata, args
        ),
    }
    results["ratio_qbmscanvi_over_scanvi"] = {
        key: results["QBMSCANVI"]["held_out"][key] / results["scANVI"]["held_out"][key]
        for key in ("accuracy", "f1_weighted", "f1_macro")
    }
    ratios = results["ratio_qbmscanvi_over_scanvi"]
    print(
        f"ratio QBMSCANVI / scANVI on {HELD_OUT}: accuracy {ratios['accuracy']:.3f}, weighted F1 "
        f"{ratios['f1_weighted']:.3f}, macro F1 {ratios['f1_macro']:.3f}; total "
        f"{time.perf_counter() - start:.0f} s",
        flush=True,
    )
    if args.out:
        write(results, args, Path(args.out))


if __name__ == "__main__":
    main()
