"""QBMVAE under Lightning DDP on 2 CPU processes (gloo): chains per rank, one log Z, loads."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).parent / "scripts" / "ddp_train.py"


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    out = tmp_path_factory.mktemp("ddp")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), str(out)],
        cwd=out,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, [torch.load(out / f"rank{r}.pt") for r in (0, 1)]


def test_each_rank_keeps_its_own_chains(ddp_run):
    _, (rank0, rank1) = ddp_run
    # Same parameters on both ranks (DDP synchronises them) ...
    assert torch.allclose(rank0["h"], rank1["h"])
    # ... but the persistent chains are the rank's own: not broadcast from rank 0, and not
    # the same random numbers.
    assert rank0["chains"].shape == rank1["chains"].shape == (32, 24)
    assert (rank0["chains"] != rank1["chains"]).any(dim=1).float().mean() > 0.5


def test_log_z_is_one_pooled_estimate(ddp_run):
    _, (rank0, rank1) = ddp_run
    assert rank0["log_z"] == rank1["log_z"] and rank0["log_z_stderr"] == rank1["log_z_stderr"]
    assert torch.isfinite(torch.tensor(rank0["log_z"])) and rank0["log_z_stderr"] > 0
    history = rank0["history"]
    # Diagnostics are reduced across ranks and logged once per epoch.
    assert len(history["sampler_seconds"]) == 2 and min(history["sampler_seconds"]) > 0
    assert history["sampler_fallbacks"] == [0.0, 0.0]


def test_ddp_model_loads_in_one_process(ddp_run):
    import scqbm

    out, (rank0, _) = ddp_run
    model = scqbm.QBMVAE.load(out / "model")
    assert torch.equal(model.module.sampler.state, rank0["chains"])
    assert float(model.module.prior.log_z) == pytest.approx(rank0["log_z"])
    latent = model.get_latent_representation()
    assert latent.shape == (model.adata.n_obs, 24)
    # It trains on in a single process.
    model.train(max_epochs=1, batch_size=48, enable_progress_bar=False)


def test_single_process_fit_after_ddp_in_the_same_process(ddp_run):
    # The documented way to train on in one process after a DDP fit (the user guide's DDP
    # section): destroy the process group that Lightning leaves, then train.
    out, _ = ddp_run
    after = torch.load(out / "after_ddp.pt")
    # The history goes on from the 2 DDP epochs.
    assert after["epochs"] == 3 and torch.isfinite(torch.tensor(after["log_z"]))
