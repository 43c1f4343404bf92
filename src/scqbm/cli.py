"""The ``scqbm`` command: ``integrate``, ``benchmark`` and ``serve-sampler``."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

DEFAULT_EPOCHS = 30


class UsageError(Exception):
    """A user error of the command line: printed as one line naming the flag, exit code 2."""


def _add_integrate(subparsers) -> None:
    p = subparsers.add_parser(
        "integrate",
        help="Train QBMVAE on an .h5ad file and write the results to --out.",
        description=(
            "Train QBMVAE and write a new .h5ad at --out with the cells and genes used for "
            "training plus the results: obsm[KEY] (embedding), obs['qbmvae_energy'], "
            "uns['qbmvae'] and, unless --no-umap, the neighbour graph and obsm['X_umap']. "
            "The input file is never changed, unless --out names it and --overwrite is "
            "given: then the full input (all cells and genes) is rewritten with the results "
            "added (NaN for cells not used), atomically. Without INPUT, uses the Kang 2018 "
            "IFN-beta PBMCs (2,000 HVGs, batch 'stim'). User errors are one line and exit "
            "code 2; --debug shows the traceback."
        ),
    )
    p.add_argument("input", nargs="?", help="Input .h5ad (raw counts in X or --layer).")
    p.add_argument(
        "--out",
        "-o",
        default="out/qbmvae.h5ad",
        help="Output .h5ad, written atomically (default: %(default)s).",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="Allow --out to be the input file (the full input is kept, results added).",
    )
    p.add_argument("--debug", action="store_true", help="Show tracebacks of errors.")
    p.add_argument("--batch-key", help="obs column with the batch (default dataset: stim).")
    p.add_argument("--labels-key", help="obs column with cell-type labels (optional).")
    p.add_argument("--layer", help="Layer with raw counts (default: X).")
    p.add_argument(
        "--genes-key", help="Boolean var column selecting genes (e.g. highly_variable)."
    )
    p.add_argument(
        "--n-top-genes", type=int, help="Select this many seurat_v3 HVGs on the counts first."
    )
    p.add_argument("--key-added", default="X_qbmvae", help="obsm key (default: %(default)s).")
    p.add_argument(
        "--max-epochs", type=int, default=DEFAULT_EPOCHS, help="Epochs (default: %(default)s)."
    )
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument(
        "--n-latent", type=int, default=32, help="Binary latent units (default: %(default)s)."
    )
    p.add_argument(
        "--prior", choices=["bm", "rbm"], default="rbm", help="Prior (default: %(default)s)."
    )
    p.add_argument("--relaxation", choices=["spike_exp", "overlapping_exp"], default="spike_exp")
    p.add_argument(
        "--gene-likelihood", choices=["zinb", "nb", "poisson", "normal"], default="zinb"
    )
    p.add_argument("--sampler", default="gibbs", help="Negative-phase sampler backend.")
    p.add_argument(
        "--sampler-kwargs", type=json.loads, default=None, help="JSON dict for the sampler."
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-cells", type=int, help="Randomly subsample to this many cells first.")
    p.add_argument("--no-umap", action="store_true", help="Skip neighbors + UMAP.")
    p.add_argument("--plot", help="Save a UMAP figure (PNG) coloured by batch (and labels).")
    p.add_argument("--save-model", help="Directory to save the trained model in.")
    p.set_defaults(func=_run_integrate)


def _load_input(args):
    import anndata as ad

    from scqbm import datasets

    if args.input is None:
        adata = datasets.kang_ifnb()
        args.batch_key = args.batch_key or datasets.KANG_BATCH_KEY
        args.labels_key = args.labels_key or datasets.KANG_LABELS_KEY
        if args.genes_key is None and args.n_top_genes is None:
            args.genes_key = datasets.KANG_HVG_KEY
        source = "Kang 2018 IFN-beta PBMCs (scqbm.datasets.kang_ifnb)"
    else:
        if not Path(args.input).exists():
            raise UsageError(f"input file {args.input!r} does not exist.")
        try:
            adata = ad.read_h5ad(args.input)
        except (OSError, KeyError, ValueError) as err:
            raise UsageError(f"cannot read {args.input!r} as .h5ad: {err}") from err
        source = args.input
    return adata, source


def _same_file(a, b) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return Path(a).resolve() == Path(b).resolve()


def _check_out(args) -> bool:
    """Whether --out is the input (allowed only with --overwrite)."""
    if args.input is None or not Path(args.out).exists() or not _same_file(args.out, args.input):
        return False
    if not args.overwrite:
        raise UsageError(
            f"--out {args.out!r} is the input file; choose another --out, or pass --overwrite "
            "to rewrite the input with the results added (all its cells and genes are kept)."
        )
    return True


def _check_args(adata, args) -> None:
    """Every flag that names data must name something in the input; one line otherwise."""
    from scqbm._validation import InvalidInputError, get_layer, scan_expression

    for flag, key in (("--batch-key", args.batch_key), ("--labels-key", args.labels_key)):
        if key is not None and key not in adata.obs:
            raise UsageError(
                f"{flag} {key!r} is not a column of obs (available: "
                f"{list(adata.obs.columns)[:15]})."
            )
    if args.layer is not None and args.layer not in adata.layers:
        raise UsageError(
            f"--layer {args.layer!r} is not a layer of the input (available: "
            f"{[k for k in adata.layers if k is not None] or 'none'}); omit --layer to use X."
        )
    if args.genes_key is not None and args.genes_key not in adata.var:
        raise UsageError(
            f"--genes-key {args.genes_key!r} is not a column of var "
            f"(available: {list(adata.var.columns)[:15]})."
        )
    if args.n_top_genes is not None and not 1 <= args.n_top_genes <= adata.n_vars:
        raise UsageError(f"--n-top-genes must be between 1 and {adata.n_vars} (the genes).")
    for flag, value in (("--max-epochs", args.max_epochs), ("--batch-size", args.batch_size)):
        if value < 1:
            raise UsageError(f"{flag} must be a positive integer, got {value}.")
    if args.gene_likelihood != "normal":
        where = "X" if args.layer is None else f"layer {args.layer!r}"
        try:
            is_integer = scan_expression(get_layer(adata, args.layer), where).is_integer
        except InvalidInputError as err:
            raise UsageError(f"{err} (check --layer)") from None
        if not is_integer:
            raise UsageError(
                f"{where} holds non-integer values, but --gene-likelihood "
                f"{args.gene_likelihood} needs raw counts: pass --layer NAME with the raw "
                "counts, or --gene-likelihood normal for log-normalised data."
            )


def _select_genes(adata, args):
    import numpy as np
    import scanpy as sc

    if args.genes_key is not None:
        return adata[:, np.asarray(adata.var[args.genes_key], dtype=bool)].copy()
    if args.n_top_genes is not None:
        # Not in place: the input AnnData stays whole (it may be written back with results).
        hvg = sc.pp.highly_variable_genes(
            adata,
            n_top_genes=args.n_top_genes,
            flavor="seurat_v3",
            layer=args.layer,
            batch_key=args.batch_key,
            inplace=False,
        )
        selected = hvg["highly_variable"].reindex(adata.var_names).fillna(False)
        return adata[:, selected.to_numpy(dtype=bool)].copy()
    return adata


def _drop_empty(adata, layer):
    """Drop genes and cells without counts (subsetting can create them), saying how many."""
    import numpy as np

    from scqbm._validation import get_layer

    matrix = get_layer(adata, layer)
    genes = np.asarray(matrix.sum(axis=0)).ravel() > 0
    cells = np.asarray(matrix.sum(axis=1)).ravel() > 0
    if genes.all() and cells.all():
        return adata
    print(
        f"scqbm integrate: dropping {int((~genes).sum())} genes and {int((~cells).sum())} "
        "cells without counts",
        flush=True,
    )
    return adata[cells, genes].copy()


def _run_integrate(args) -> int:
    import numpy as np

    from scqbm import tl

    started = time.perf_counter()
    into_input = _check_out(args)
    adata, source = _load_input(args)
    _check_args(adata, args)
    full = adata if into_input else None
    if args.max_cells is not None and args.max_cells < adata.n_obs:
        rng = np.random.default_rng(args.seed)
        adata = adata[np.sort(rng.choice(adata.n_obs, args.max_cells, replace=False))].copy()
    adata = _select_genes(adata, args)
    adata = _drop_empty(adata, args.layer)
    print(
        f"scqbm integrate: {adata.n_obs:,} cells x {adata.n_vars:,} genes from {source}",
        flush=True,
    )
    model = tl.integrate(
        adata,
        batch_key=args.batch_key,
        layer=args.layer,
        labels_key=args.labels_key,
        key_added=args.key_added,
        max_epochs=args.max_epochs,
        seed=args.seed,
        model_kwargs={
            "n_latent": args.n_latent,
            "prior": args.prior,
            "relaxation": args.relaxation,
            "gene_likelihood": args.gene_likelihood,
            "sampler": args.sampler,
            "sampler_kwargs": args.sampler_kwargs,
        },
        train_kwargs={"batch_size": args.batch_size},
    )
    trained = time.perf_counter()
    if not args.no_umap:
        import scanpy as sc

        sc.pp.neighbors(adata, use_rep=args.key_added)
        sc.tl.umap(adata, random_state=args.seed)
        if args.plot:
            _plot(adata, args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    _write_atomically(_with_results(full, adata, args) if into_input else adata, out)
    if args.save_model:
        model.save(args.save_model, overwrite=True)
    _summary(model, adata, args, out, started, trained)
    return 0


def _with_results(full, adata, args):
    """The full input with the results of ``adata`` (a subset of its cells) added."""
    import numpy as np

    rows = full.obs_names.get_indexer(adata.obs_names)
    keys = [args.key_added] + ([] if args.no_umap else ["X_umap"])
    for key in keys:
        values = np.full((full.n_obs, adata.obsm[key].shape[1]), np.nan, dtype=np.float32)
        values[rows] = adata.obsm[key]
        full.obsm[key] = values
    energy = np.full(full.n_obs, np.nan)
    energy[rows] = adata.obs["qbmvae_energy"].to_numpy()
    full.obs["qbmvae_energy"] = energy
    full.uns["qbmvae"] = adata.uns["qbmvae"]
    if not args.no_umap and adata.n_obs == full.n_obs and (rows == np.arange(full.n_obs)).all():
        for key in ("distances", "connectivities"):
            full.obsp[key] = adata.obsp[key]
        full.uns["neighbors"], full.uns["umap"] = adata.uns["neighbors"], adata.uns["umap"]
    return full


def _write_atomically(adata, out: Path) -> None:
    """Write to a temporary file next to ``out``, then rename: never a half-written file."""
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        adata.write_h5ad(tmp)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()


def _plot(adata, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import scanpy as sc

    colors = [c for c in (args.batch_key, args.labels_key) if c is not None]
    fig = sc.pl.umap(adata, color=colors or None, show=False, return_fig=True, frameon=False)
    Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.plot, dpi=110, bbox_inches="tight")


def _summary(model, adata, args, out, started, trained) -> None:
    import numpy as np

    history = model.history
    elbo = history["elbo_train"].iloc[-1, 0] if "elbo_train" in history else float("nan")
    log_z = model.get_log_partition()
    energy = adata.obs["qbmvae_energy"]
    n_epochs = len(history["elbo_train"]) if "elbo_train" in history else args.max_epochs
    train_seconds = trained - started
    lines = [
        "",
        "scqbm integrate: done",
        f"  cells x genes        {adata.n_obs:,} x {adata.n_vars:,}",
        f"  batches              {adata.obs[args.batch_key].nunique() if args.batch_key else 1}",
        f"  epochs               {n_epochs} ({model.module.prior.structure} prior, "
        f"{model.module.prior.n_units} binary units, sampler {args.sampler})",
        f"  load + train time    {train_seconds:,.1f} s",
        f"  final train ELBO     {-elbo:,.2f} per cell (higher is better)",
        f"  log Z                {log_z.value:.4f} +/- {log_z.stderr:.4f} ({log_z.method})",
        f"  cell energy          median {np.median(energy):.3f}, "
        f"range [{energy.min():.3f}, {energy.max():.3f}]",
        f"  wrote                {out} (obsm[{args.key_added!r}], obs['qbmvae_energy']"
        + ("" if args.no_umap else ", obsm['X_umap']")
        + ")",
    ]
    if args.plot and not args.no_umap:
        lines.append(f"  figure               {args.plot}")
    if args.save_model:
        lines.append(f"  model                {args.save_model}")
    print("\n".join(lines), flush=True)


def _add_serve_sampler(subparsers) -> None:
    p = subparsers.add_parser(
        "serve-sampler",
        help="Serve a Boltzmann sampler backend over HTTP (for the 'remote' sampler).",
    )
    try:
        from scqbm.samplers.service import add_serve_arguments, run_serve
    except ImportError:  # the service module is optional until its extra is installed
        p.set_defaults(func=lambda args: _missing("service"))
        return
    add_serve_arguments(p)
    p.set_defaults(func=run_serve)


def _add_benchmark(subparsers) -> None:
    p = subparsers.add_parser("benchmark", help="Run the evidence suite (scqbm.benchmark).")
    try:
        from scqbm.benchmark import add_benchmark_arguments, run_benchmark
    except ImportError:
        p.set_defaults(func=lambda args: _missing("benchmark"))
        return
    add_benchmark_arguments(p)
    p.set_defaults(func=run_benchmark)


def _missing(what: str) -> int:
    print(f"scqbm: the {what} command is not available in this installation.", file=sys.stderr)
    return 2


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``scqbm`` command."""
    parser = argparse.ArgumentParser(
        prog="scqbm", description="Boltzmann-machine priors for single-cell VAEs (QBM-VAE)."
    )
    from scqbm import __version__

    parser.add_argument("--version", action="version", version=f"scqbm {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_integrate(subparsers)
    _add_benchmark(subparsers)
    _add_serve_sampler(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``scqbm`` command.

    User errors (bad flags, data that does not fit them) print one line naming what to
    change and return 2; ``--debug`` raises them with the traceback instead.
    """
    args = build_parser().parse_args(argv)
    from scqbm._validation import InvalidInputError

    try:
        return int(args.func(args) or 0)
    except (UsageError, InvalidInputError) as err:
        if getattr(args, "debug", False):
            raise
        print(f"scqbm {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except Exception as err:
        from scqbm.samplers import SamplerError

        if getattr(args, "debug", False) or not isinstance(err, SamplerError | ValueError):
            raise
        print(
            f"scqbm {args.command}: error: {_one_line(err)} (--debug for the traceback)",
            file=sys.stderr,
        )
        return 2


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
