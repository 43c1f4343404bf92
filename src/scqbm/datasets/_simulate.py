"""Simulated counts with known cell types, rare populations, a branching trajectory and batches."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from anndata import AnnData
from scipy import sparse

__all__ = ["simulate"]

TRAJECTORY_LABELS = ("traj_stem", "traj_branch_A", "traj_branch_B")


def _allocate(n_cells: int, fractions: Sequence[float]) -> np.ndarray:
    """Integer counts per group from fractions summing to one (largest remainders)."""
    raw = np.asarray(fractions, dtype=float) * n_cells
    counts = np.floor(raw).astype(int)
    rest = n_cells - counts.sum()
    order = np.argsort(-(raw - counts), kind="stable")
    counts[order[:rest]] += 1
    return counts


def simulate(
    n_cells: int = 4_000,
    n_genes: int = 1_000,
    n_batches: int = 2,
    batch_strength: float = 0.5,
    rare_fractions: float | Sequence[float] = (0.01, 0.005, 0.002),
    n_cell_types: int = 4,
    trajectory_fraction: float = 0.3,
    branch_point: float = 0.35,
    n_markers: int = 25,
    marker_lfc: float = 1.5,
    library_size: float = 3_000.0,
    library_shift: float | None = None,
    dispersion: float = 5.0,
    seed: int = 0,
) -> AnnData:
    """Negative-binomial counts with ground-truth cell types, trajectory and batch effects.

    Cells fall into ``n_cell_types`` common types, rare subtypes (each a child of one common
    type with its own marker genes), and a branching lineage: a stem (pseudotime below
    ``branch_point``) that splits into branches ``A`` and ``B``. Expression is

    ``mu_cg = l_c * softmax_g(base_g + type_cg + trajectory_cg + batch_bg)``

    with ``counts ~ NB(mu, theta_g)`` (gamma-Poisson). Batches are assigned independently of
    cell type, so with ``batch_strength=0`` (and no library shift) the batch label carries no
    signal at all.

    Parameters
    ----------
    n_cells, n_genes
        Size of the matrix.
    n_batches
        Number of batches, assigned uniformly at random to cells.
    batch_strength
        Standard deviation of the per-gene log-fold change of each batch (natural log), and
        scale of the per-batch library-size shift (see ``library_shift``). ``0``: no batch effect.
    rare_fractions
        Fraction of all cells in each rare population (a float for one population). Each rare
        population ``rare_k`` is a subtype of common type ``type_{k mod n_cell_types}``: it has
        that type's markers plus ``n_markers`` of its own. Counts are exact up to rounding.
    n_cell_types
        Number of common (discrete) cell types; they share the cells left after the rare and
        trajectory cells, equally.
    trajectory_fraction
        Fraction of cells on the branching trajectory (labelled ``traj_stem``,
        ``traj_branch_A``, ``traj_branch_B``).
    branch_point
        Pseudotime in (0, 1) at which the stem splits.
    n_markers
        Marker genes per common type, per rare type, and per trajectory program (lineage,
        progression, branch A, branch B); each program uses its own genes.
    marker_lfc
        Mean natural-log fold change of marker genes (drawn from ``N(marker_lfc, 0.3)``).
    library_size
        Median total counts per cell (log-normal, sd 0.3 on the log scale).
    library_shift
        Shift of the log library size between the first and the last batch (evenly spaced in
        between). ``None``: ``0.5 * batch_strength``.
    dispersion
        Median inverse dispersion ``theta`` of the negative binomial (per gene, log-normal).
    seed
        Seed of the :class:`numpy.random.Generator`; the output is a deterministic function of
        all arguments.

    Returns
    -------
    AnnData with raw counts in ``X`` and ``layers["counts"]`` (CSR, float32) and

    * ``obs["cell_type"]``: common types ``type_k``, rare types ``rare_k``, trajectory labels;
    * ``obs["batch"]``: ``batch_0`` ...;
    * ``obs["pseudotime"]``: ground truth in [0, 1] on the trajectory, NaN elsewhere;
    * ``obs["branch"]``: ``stem`` / ``A`` / ``B`` on the trajectory, ``none`` elsewhere;
    * ``obs["is_rare"]``, ``obs["library_size"]``;
    * ``var["program"]``: which program a gene belongs to (``marker_type_0``, ``marker_rare_0``,
      ``lineage``, ``progression_up``, ``progression_down``, ``branch_A``, ``branch_B`` or
      ``none``), ``var["theta"]``;
    * ``varm["batch_lfc"]``: the true per-gene batch log-fold changes ``(n_genes, n_batches)``;
    * ``uns["simulation"]``: the arguments.

    Examples
    --------
    >>> from scqbm.datasets import simulate
    >>> adata = simulate(n_cells=2_000, n_genes=500, batch_strength=1.0, seed=0)
    >>> adata.obs["cell_type"].value_counts()["rare_2"]  # 0.2% of 2,000 cells
    4
    >>> import scqbm
    >>> scqbm.QBMVAE.setup_anndata(adata, layer="counts", batch_key="batch")
    >>> model = scqbm.QBMVAE(adata)

    """
    if isinstance(rare_fractions, int | float):
        rare_fractions = (float(rare_fractions),)
    rare_fractions = tuple(float(f) for f in rare_fractions)
    if n_cells < 10 or n_genes < 10:
        raise ValueError(f"Need at least 10 cells and 10 genes, got {n_cells} x {n_genes}.")
    if n_batches < 1:
        raise ValueError(f"`n_batches` must be >= 1, got {n_batches}.")
    if batch_strength < 0:
        raise ValueError(f"`batch_strength` must be >= 0, got {batch_strength}.")
    if n_cell_types < 1:
        raise ValueError(f"`n_cell_types` must be >= 1, got {n_cell_types}.")
    if any(f <= 0 for f in rare_fractions) or not 0 <= trajectory_fraction < 1:
        raise ValueError("`rare_fractions` must be positive and `trajectory_fraction` in [0, 1).")
    common_fraction = 1.0 - sum(rare_fractions) - trajectory_fraction
    if common_fraction <= 0:
        raise ValueError(
            f"Rare ({sum(rare_fractions):.3f}) and trajectory ({trajectory_fraction:.3f}) "
            "fractions leave no cells for the common types."
        )
    if not 0 < branch_point < 1:
        raise ValueError(f"`branch_point` must lie in (0, 1), got {branch_point}.")
    n_programs = n_cell_types + len(rare_fractions) + 5
    if n_programs * n_markers > n_genes:
        raise ValueError(
            f"{n_programs} gene programs x {n_markers} markers need more than {n_genes} genes: "
            "lower `n_markers` or raise `n_genes`."
        )
    if library_shift is None:
        library_shift = 0.5 * batch_strength
    rng = np.random.default_rng(seed)

    # ---------------------------------------------------------------- populations
    n_rare = len(rare_fractions)
    fractions = [common_fraction / n_cell_types] * n_cell_types + list(rare_fractions)
    fractions.append(trajectory_fraction)
    sizes = _allocate(n_cells, fractions)
    group = np.repeat(np.arange(len(sizes)), sizes)  # 0..C-1 common, C..C+R-1 rare, last traj
    traj_group = n_cell_types + n_rare
    is_traj = group == traj_group
    n_traj = int(is_traj.sum())
    pseudotime = np.full(n_cells, np.nan)
    branch = np.full(n_cells, "none", dtype=object)
    t = np.sort(rng.uniform(0.0, 1.0, n_traj))
    on_branch = t >= branch_point
    side = np.where(rng.random(n_traj) < 0.5, "A", "B")
    pseudotime[is_traj] = t
    branch[is_traj] = np.where(on_branch, side, "stem")

    labels = np.empty(n_cells, dtype=object)
    for k in range(n_cell_types):
        labels[group == k] = f"type_{k}"
    for r in range(n_rare):
        labels[group == n_cell_types + r] = f"rare_{r}"
    labels[is_traj] = np.where(
        branch[is_traj] == "stem",
        TRAJECTORY_LABELS[0],
        np.where(branch[is_traj] == "A", TRAJECTORY_LABELS[1], TRAJECTORY_LABELS[2]),
    )

    # ------------------------------------------------------------ gene programs
    program = np.full(n_genes, "none", dtype=object)
    gene_order = rng.permutation(n_genes)
    blocks = iter(np.array_split(gene_order[: n_programs * n_markers], n_programs))
    program_genes: dict[str, np.ndarray] = {}
    names = [f"marker_type_{k}" for k in range(n_cell_types)]
    names += [f"marker_rare_{r}" for r in range(n_rare)]
    names += ["lineage", "progression_up", "progression_down", "branch_A", "branch_B"]
    for name in names:
        genes = next(blocks)
        program_genes[name] = genes
        program[genes] = name

    base = rng.normal(0.0, 1.0, n_genes)  # log relative abundance
    log_rate = np.tile(base, (n_cells, 1))

    def _lfc(size: int) -> np.ndarray:
        return np.abs(rng.normal(marker_lfc, 0.3, size))

    for k in range(n_cell_types):
        genes = program_genes[f"marker_type_{k}"]
        log_rate[np.ix_(group == k, genes)] += _lfc(genes.size)
    for r in range(n_rare):
        rows = group == n_cell_types + r
        parent = program_genes[f"marker_type_{r % n_cell_types}"]
        log_rate[np.ix_(rows, parent)] += _lfc(parent.size)
        genes = program_genes[f"marker_rare_{r}"]
        log_rate[np.ix_(rows, genes)] += _lfc(genes.size)
    if n_traj:
        rows = np.flatnonzero(is_traj)
        genes = program_genes["lineage"]
        log_rate[np.ix_(rows, genes)] += _lfc(genes.size)
        # Progression genes change monotonically with pseudotime on every branch.
        up, down = program_genes["progression_up"], program_genes["progression_down"]
        log_rate[np.ix_(rows, up)] += np.outer(t, 1.5 * _lfc(up.size))
        log_rate[np.ix_(rows, down)] += np.outer(1.0 - t, 1.5 * _lfc(down.size))
        # Branch genes rise from the branch point to the tip of their own branch only.
        progress = np.clip((t - branch_point) / (1.0 - branch_point), 0.0, 1.0)
        for name in ("A", "B"):
            genes = program_genes[f"branch_{name}"]
            sel = rows[branch[rows] == name]
            log_rate[np.ix_(sel, genes)] += np.outer(
                progress[branch[rows] == name], 1.5 * _lfc(genes.size)
            )

    # ------------------------------------------------------------------ batches
    batch = rng.integers(0, n_batches, n_cells)
    batch_lfc = rng.normal(0.0, 1.0, (n_batches, n_genes)) * batch_strength
    log_rate += batch_lfc[batch]
    shifts = library_shift * (np.linspace(-0.5, 0.5, n_batches) if n_batches > 1 else np.zeros(1))
    library = np.exp(np.log(library_size) + shifts[batch] + rng.normal(0.0, 0.3, n_cells))

    # ------------------------------------------------------------------- counts
    log_rate -= log_rate.max(axis=1, keepdims=True)
    rate = np.exp(log_rate)
    mu = rate / rate.sum(axis=1, keepdims=True) * library[:, None]
    theta = np.exp(np.log(dispersion) + rng.normal(0.0, 0.5, n_genes))
    counts = rng.poisson(rng.gamma(shape=theta, scale=mu / theta)).astype(np.float32)

    # Shuffle cells so that groups are not contiguous.
    order = rng.permutation(n_cells)
    obs = pd.DataFrame(
        {
            "cell_type": pd.Categorical(
                labels[order],
                categories=[f"type_{k}" for k in range(n_cell_types)]
                + [f"rare_{r}" for r in range(n_rare)]
                + list(TRAJECTORY_LABELS),
            ),
            "batch": pd.Categorical([f"batch_{b}" for b in batch[order]]),
            "pseudotime": pseudotime[order],
            "branch": pd.Categorical(branch[order], categories=["none", "stem", "A", "B"]),
            "is_rare": (group[order] >= n_cell_types) & (group[order] < traj_group),
            "library_size": counts[order].sum(axis=1),
        },
        index=[f"cell_{i}" for i in range(n_cells)],
    )
    obs["cell_type"] = obs["cell_type"].cat.remove_unused_categories()
    var = pd.DataFrame(
        {"program": pd.Categorical(program), "theta": theta},
        index=[f"gene_{g}" for g in range(n_genes)],
    )
    X = sparse.csr_matrix(counts[order])
    adata = AnnData(X=X, obs=obs, var=var)
    adata.layers["counts"] = X.copy()
    adata.varm["batch_lfc"] = batch_lfc.T.copy()
    adata.uns["simulation"] = {
        "n_cells": n_cells,
        "n_genes": n_genes,
        "n_batches": n_batches,
        "batch_strength": float(batch_strength),
        "rare_fractions": list(rare_fractions),
        "n_cell_types": n_cell_types,
        "trajectory_fraction": float(trajectory_fraction),
        "branch_point": float(branch_point),
        "n_markers": n_markers,
        "marker_lfc": float(marker_lfc),
        "library_size": float(library_size),
        "library_shift": float(library_shift),
        "dispersion": float(dispersion),
        "seed": seed,
    }
    return adata
