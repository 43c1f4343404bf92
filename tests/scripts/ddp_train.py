"""Train a tiny QBMVAE with Lightning DDP on 2 CPU processes (run by tests/test_ddp.py).

Lightning's DDP launcher re-runs this script once per extra rank (``LOCAL_RANK`` set), so it
must be a script, not a pytest function. Every rank writes its chains and log Z to
``OUT/rank{r}.pt``; rank 0 also saves the model to ``OUT/model``, then, after rank 1 has
exited, trains the model on in a single process in this same process and writes
``OUT/after_ddp.pt``.

Usage: python ddp_train.py OUT [N_LATENT] [ACCELERATOR]
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import torch

torch.set_num_threads(1)
warnings.filterwarnings("ignore")

import anndata as ad  # noqa: E402
import numpy as np  # noqa: E402
import scvi  # noqa: E402

import scqbm  # noqa: E402


def tiny_data(n_cells: int = 192, n_genes: int = 30) -> ad.AnnData:
    """Deterministic NB-like counts with two types and two batches (same on every rank)."""
    rng = np.random.default_rng(0)
    types = rng.integers(0, 2, n_cells)
    means = np.where(types[:, None] == 1, 4.0, 1.0) * rng.gamma(2.0, 0.5, (1, n_genes))
    adata = ad.AnnData(rng.poisson(rng.gamma(5.0, means / 5.0)).astype(np.float32))
    adata.obs["batch"] = np.where(np.arange(n_cells) % 2 == 0, "a", "b")
    return adata


def main(out: Path, n_latent: int, accelerator: str = "cpu") -> None:
    scvi.settings.seed = 0
    adata = tiny_data()
    scqbm.QBMVAE.setup_anndata(adata, batch_key="batch")
    model = scqbm.QBMVAE(
        adata,
        n_hidden=16,
        n_latent=n_latent,
        prior="bm",  # dense: beyond 20 units its log Z is AIS, pooled over the ranks
        sampler_kwargs={"num_chains": 32, "burn_in": 5},
        ais_kwargs={"n_chains": 32, "n_betas": 20, "final_n_chains": 64, "final_n_betas": 20},
    )
    model.train(
        max_epochs=2,
        batch_size=48,
        accelerator=accelerator,
        devices=2,
        strategy="ddp_find_unused_parameters_true",
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    rank = int(os.environ.get("LOCAL_RANK", "0"))
    module = model.module
    torch.save(
        {
            "chains": module.sampler.state.clone(),
            "log_z": float(module.prior.log_z),
            "log_z_stderr": float(module.prior.log_z_stderr),
            "h": module.prior.h.detach().clone(),
            "history": {k: v.to_numpy().ravel().tolist() for k, v in model.history_.items()}
            if rank == 0
            else {},
        },
        out / f"rank{rank}.pt",
    )
    if rank != 0:
        return
    model.save(out / "model", overwrite=True, save_anndata=True)
    # A single-process fit after the DDP one, in the same process. Lightning leaves the process
    # group initialised and scvi's torchmetrics sync over it whenever it exists (SCVI fails
    # the same way), so the documented step is to destroy it first.
    torch.distributed.destroy_process_group()
    model.train(
        max_epochs=1,
        batch_size=48,
        accelerator="cpu",
        devices=1,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    torch.save(
        {"log_z": float(module.prior.log_z), "epochs": len(model.history_["elbo_train"])},
        out / "after_ddp.pt",
    )


if __name__ == "__main__":
    main(
        Path(sys.argv[1]),
        int(sys.argv[2]) if len(sys.argv) > 2 else 24,
        sys.argv[3] if len(sys.argv) > 3 else "cpu",
    )
