"""The prepared GPU measurement (about 5 minutes on one GPU): samplers, 1M-cell epochs, DDP.

Prints the GPU model, then

1. spin updates per second of the dense (blocked scan) and RBM (block Gibbs) sweeps for 256
   and 1,024 units with 1,024 and 8,192 chains (the target for a dense 1,024-unit prior is
   1e10 spin updates/s);
2. one QBMVAE and one scVI epoch (batch size 1,024) on synthetic NB counts of 1M cells x
   2,000 genes, generated in the script (the GPU machine reaches no data files);
3. the DDP path (``tests/scripts/ddp_train.py`` on 2 GPUs) when more than one GPU is there.

Every section is skipped once ``--budget-s`` is spent. The results are printed and written
to ``OUT/gpu_check.json`` (``--out``, default ``$OUT`` or the working directory).
``--device cpu --tiny`` runs the same logic on a CPU in seconds (tests/test_gpu_check.py).

Usage::

    python benchmarks/gpu_check.py                 # on the GPU machine
    python benchmarks/gpu_check.py --device cpu --tiny
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--tiny", action="store_true", help="small sizes (a logic check on a CPU)")
    p.add_argument("--budget-s", type=float, default=280.0, help="stop starting new sections")
    p.add_argument("--cells", type=int, help="cells of the training epochs (default 1M)")
    p.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for the JSON")
    return p.parse_args(argv)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def sweep_rate(structure, n, n_chains, device, sweeps, block_size=None) -> float:
    """Spin updates per second of ``sweeps`` sweeps of ``n_chains`` chains of ``n`` units."""
    from scqbm.prior import bipartite_gibbs_sweep, dense_gibbs_sweep

    gen = torch.Generator(device=device).manual_seed(0)
    W = torch.randn(n, n, device=device, generator=gen) * (0.5 / n**0.5)
    W = (W + W.T) / 2
    W.fill_diagonal_(0.0)
    h = 0.1 * torch.randn(n, device=device, generator=gen)
    z = torch.randint(0, 2, (n_chains, n), device=device, generator=gen).float()
    if structure == "rbm":
        W[: n // 2, : n // 2] = 0.0
        W[n // 2 :, n // 2 :] = 0.0

        def step(z):
            return bipartite_gibbs_sweep(z, h, W, n // 2, generator=gen)
    else:

        def step(z):
            return dense_gibbs_sweep(z, h, W, generator=gen, block_size=block_size)

    z = step(z)  # warm-up (kernels, allocator)
    _sync(device)
    start = time.perf_counter()
    for _ in range(sweeps):
        z = step(z)
    _sync(device)
    return n_chains * n * sweeps / (time.perf_counter() - start)


def synthetic_counts(n_cells: int, n_genes: int, seed: int = 0):
    """NB counts of ``n_types`` cell types and two batches, as float32 CSR (built in chunks)."""
    import anndata as ad
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    n_types = 20
    # Sparse, skewed gene means per type (most genes low: ~90% zeros, as in 10x data).
    profiles = rng.lognormal(-2.5, 1.5, (n_types, n_genes)).astype(np.float32)
    blocks = []
    types = rng.integers(0, n_types, n_cells)
    for start in range(0, n_cells, 100_000):
        t = types[start : start + 100_000]
        library = rng.lognormal(0.0, 0.3, (len(t), 1)).astype(np.float32)
        mean = profiles[t] * library
        counts = rng.poisson(rng.gamma(5.0, mean / 5.0)).astype(np.float32)
        empty = np.flatnonzero(counts.sum(1) == 0)  # models refuse cells without counts
        counts[empty, rng.integers(0, n_genes, len(empty))] = 1.0
        blocks.append(sp.csr_matrix(counts))
    adata = ad.AnnData(sp.vstack(blocks, format="csr"))
    adata.obs["batch"] = np.where(rng.random(n_cells) < 0.5, "a", "b")
    adata.obs["cell_type"] = types.astype(str)
    return adata


def epoch_seconds(cls, adata, device, batch_size, **kwargs) -> float:
    """Wall seconds of one training epoch of ``cls`` on ``adata``."""
    work = adata.copy()
    cls.setup_anndata(work, batch_key="batch")
    model = cls(work, **kwargs)
    accelerator = "gpu" if device.type == "cuda" else "cpu"
    start = time.perf_counter()
    model.train(
        max_epochs=1,
        batch_size=batch_size,
        accelerator=accelerator,
        devices=1,
        enable_progress_bar=False,
    )
    return time.perf_counter() - start


def main(argv=None) -> dict:
    args = parse_args(argv)
    t0 = time.perf_counter()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("No CUDA device: run with --device cpu (and --tiny) for a logic check.")
    if device.type == "cpu":
        torch.set_num_threads(1)
    result: dict = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "n_gpus": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "tiny": args.tiny,
        "sweeps": [],
        "skipped": [],
    }
    print(f"device: {result['device']} ({result['n_gpus']} GPUs), torch {torch.__version__}")

    def left() -> float:
        return args.budget_s - (time.perf_counter() - t0)

    # 1. Sampler throughput.
    sizes = (16, 32) if args.tiny else (256, 1024)
    chains = (8, 32) if args.tiny else (1024, 8192)
    sweeps = 2 if args.tiny else 5
    print(f"{'sampler':>8} {'units':>6} {'chains':>7} {'block':>6} {'spin updates/s':>15}")
    for structure in ("dense", "rbm"):
        for n in sizes:
            for c in chains:
                # Wider blocks mean fewer sequential in-block steps, which is what a GPU waits on.
                blocks = (None, 256) if structure == "dense" else (None,)
                for block in blocks:
                    if left() < 0:
                        result["skipped"].append(f"sweep {structure} {n} {c} {block}")
                        continue
                    rate = sweep_rate(structure, n, c, device, sweeps, block_size=block)
                    row = {"sampler": structure, "units": n, "chains": c, "block": block}
                    row["spin_updates_per_s"] = rate
                    result["sweeps"].append(row)
                    print(f"{structure:>8} {n:>6} {c:>7} {block or 64!s:>6} {rate:>15.3g}")
    dense = [r for r in result["sweeps"] if r["sampler"] == "dense" and r["units"] == max(sizes)]
    if dense:
        best = max(r["spin_updates_per_s"] for r in dense)
        result["dense_target_met"] = best >= 1e10
        print(f"dense {max(sizes)} units: best {best:.3g} spin updates/s (target 1e10)")

    # 2. One epoch of QBMVAE and of scVI on many cells.
    n_cells = args.cells or (400 if args.tiny else 1_000_000)
    n_genes = 40 if args.tiny else 2000
    if left() > 0:
        import scvi

        import scqbm

        start = time.perf_counter()
        adata = synthetic_counts(n_cells, n_genes)
        result["data_seconds"] = time.perf_counter() - start
        kwargs = {"n_latent": 8, "n_hidden": 16} if args.tiny else {}
        epochs = {}
        for name, cls in (("scvi", scvi.model.SCVI), ("qbmvae", scqbm.QBMVAE)):
            if left() < 0:
                result["skipped"].append(f"epoch {name}")
                continue
            epochs[name] = epoch_seconds(cls, adata, device, 1024, **kwargs)
            print(f"{name}: one epoch on {n_cells:,} cells in {epochs[name]:.1f} s")
        result["epoch_seconds"] = epochs
        result["n_cells"] = n_cells
        if len(epochs) == 2:
            result["epoch_ratio"] = epochs["qbmvae"] / epochs["scvi"]
            print(f"QBMVAE / scVI epoch time: {result['epoch_ratio']:.2f}x")
    else:
        result["skipped"].append("epochs")

    # 3. DDP on two GPUs.
    if device.type == "cuda" and result["n_gpus"] > 1 and left() > 60:
        out = Path(args.out) / "ddp"
        out.mkdir(parents=True, exist_ok=True)
        script = ROOT / "tests" / "scripts" / "ddp_train.py"
        start = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, str(script), str(out), "24", "gpu"],
            capture_output=True,
            text=True,
            timeout=max(60, int(left())),
        )
        result["ddp"] = {
            "returncode": proc.returncode,
            "seconds": time.perf_counter() - start,
            "stderr_tail": proc.stderr[-2000:] if proc.returncode else "",
        }
        print(f"DDP on 2 GPUs: exit code {proc.returncode} in {result['ddp']['seconds']:.0f} s")
    else:
        result["skipped"].append("ddp (needs more than one GPU)")

    result["seconds"] = time.perf_counter() - t0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(result, indent=2))
    print(f"total {result['seconds']:.0f} s; written {out / 'gpu_check.json'}")
    return result


if __name__ == "__main__":
    main()
