from __future__ import annotations

import numpy as np
import pytest
from scipy import stats
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_score

from scqbm.datasets._simulate import simulate


def _lognorm(adata):
    X = adata.layers["counts"].toarray()
    return np.log1p(X / X.sum(axis=1, keepdims=True) * 1e4)


def test_shapes_and_fields():
    adata = simulate(n_cells=600, n_genes=400, n_batches=3, seed=1)
    assert adata.shape == (600, 400)
    X = adata.X.toarray()
    assert np.array_equal(X, adata.layers["counts"].toarray())
    assert np.all(X >= 0) and np.array_equal(X, np.round(X))
    assert set(adata.obs["batch"].cat.categories) == {"batch_0", "batch_1", "batch_2"}
    assert adata.varm["batch_lfc"].shape == (400, 3)
    traj = adata.obs["branch"] != "none"
    assert adata.obs.loc[traj, "pseudotime"].between(0, 1).all()
    assert adata.obs.loc[~traj, "pseudotime"].isna().all()
    assert set(adata.obs.loc[traj, "branch"]) == {"stem", "A", "B"}
    # The stem is exactly the part of the trajectory before the branch point.
    stem = adata.obs["branch"] == "stem"
    assert (adata.obs.loc[stem, "pseudotime"] < 0.35).all()
    assert (adata.obs.loc[traj & ~stem, "pseudotime"] >= 0.35).all()


def test_deterministic_given_seed():
    a = simulate(n_cells=300, n_genes=300, seed=7)
    b = simulate(n_cells=300, n_genes=300, seed=7)
    c = simulate(n_cells=300, n_genes=300, seed=8)
    assert (a.X != b.X).nnz == 0
    assert a.obs.equals(b.obs)
    assert (a.X != c.X).nnz > 0


@pytest.mark.parametrize("fractions", [(0.01, 0.005, 0.002), 0.03])
def test_rare_fractions(fractions):
    n = 5_000
    adata = simulate(n_cells=n, n_genes=500, rare_fractions=fractions, seed=0)
    fractions = np.atleast_1d(fractions)
    counts = adata.obs["cell_type"].value_counts()
    for r, f in enumerate(fractions):
        assert abs(counts[f"rare_{r}"] - f * n) <= 1
    assert adata.obs["is_rare"].sum() == sum(counts[f"rare_{r}"] for r in range(len(fractions)))


def _batch_accuracy(adata):
    X = _lognorm(adata)
    y = adata.obs["batch"].cat.codes.to_numpy()
    clf = LogisticRegression(max_iter=300, C=0.1)
    return cross_val_score(clf, X, y, cv=3).mean()


def test_batch_strength_controls_batch_signal():
    kwargs = {"n_cells": 800, "n_genes": 300, "n_batches": 2, "seed": 3}
    none = simulate(batch_strength=0.0, **kwargs)
    strong = simulate(batch_strength=1.0, **kwargs)
    assert np.all(none.varm["batch_lfc"] == 0)
    # Without a batch effect, batch is unpredictable from expression (chance is 0.5) ...
    assert _batch_accuracy(none) < 0.62
    # ... with a strong one it is nearly perfectly predictable.
    assert _batch_accuracy(strong) > 0.95
    # Library sizes shift between batches only with a batch effect.
    lib = strong.obs.groupby("batch", observed=True)["library_size"].median()
    assert lib["batch_1"] / lib["batch_0"] > 1.3
    lib0 = none.obs.groupby("batch", observed=True)["library_size"].median()
    assert abs(np.log(lib0["batch_1"] / lib0["batch_0"])) < 0.1


def test_cell_types_are_separable():
    adata = simulate(n_cells=1_000, n_genes=400, batch_strength=0.5, seed=2)
    X = _lognorm(adata)
    common = adata.obs["cell_type"].str.startswith("type_").to_numpy()
    y = adata.obs["cell_type"].to_numpy()[common]
    acc = cross_val_score(LogisticRegression(max_iter=300), X[common], y, cv=3).mean()
    assert acc > 0.95


def test_pseudotime_monotone_in_trajectory_genes():
    adata = simulate(n_cells=3_000, n_genes=600, batch_strength=0.3, seed=4)
    X = _lognorm(adata)
    program = adata.var["program"].to_numpy()
    obs = adata.obs
    score = X[:, program == "progression_up"].mean(1) - X[:, program == "progression_down"].mean(1)
    for name in ("A", "B"):
        cells = obs["branch"].isin(["stem", name]).to_numpy()
        t = obs["pseudotime"].to_numpy()[cells]
        rho = stats.spearmanr(t, score[cells]).statistic
        assert rho > 0.85, (name, rho)
        # Binned means increase along the branch (monotone, not just correlated).
        bins = np.quantile(t, np.linspace(0, 1, 6))
        idx = np.clip(np.digitize(t, bins[1:-1]), 0, 4)
        means = [score[cells][idx == b].mean() for b in range(5)]
        assert np.all(np.diff(means) > 0), means
        # Branch genes rise only after the branch point and only on their own branch.
        branch_score = X[:, program == f"branch_{name}"].mean(1)
        tip = cells & (obs["pseudotime"].to_numpy() > 0.8)
        other = "B" if name == "A" else "A"
        other_tip = (obs["branch"] == other).to_numpy() & (obs["pseudotime"].to_numpy() > 0.8)
        stem = (obs["branch"] == "stem").to_numpy()
        assert branch_score[tip].mean() > branch_score[stem].mean() + 0.5
        assert branch_score[tip].mean() > branch_score[other_tip].mean() + 0.5


def test_bad_arguments():
    with pytest.raises(ValueError, match="no cells for the common types"):
        simulate(n_cells=100, n_genes=400, rare_fractions=0.5, trajectory_fraction=0.6)
    with pytest.raises(ValueError, match="markers need more"):
        simulate(n_cells=100, n_genes=50)
    with pytest.raises(ValueError, match="batch_strength"):
        simulate(n_cells=100, n_genes=400, batch_strength=-1)
