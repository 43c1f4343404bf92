from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest

from scqbm.benchmark import (
    METHODS,
    aggregate_scib,
    best_matching_cluster,
    gaussian_ablation_kwargs,
    run_suite,
)
from scqbm.datasets._simulate import simulate

TINY = {
    "n_cells": 360,
    "n_genes": 300,
    "n_markers": 15,
    "rare_fractions": [0.04, 0.025],
    "batch_strength": 0.8,
}


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    # kBET is left out: its pynndescent compilation alone takes minutes on a cold process.
    kwargs = {
        "dataset": "simulated",
        "methods": ["pca", "qbmvae_rbm"],
        "seeds": [0],
        "out": out,
        "max_epochs": 2,
        "dataset_kwargs": TINY,
        "scib_exclude": ["kbet_per_label"],
        "progress": False,
    }
    first = run_suite(**kwargs)
    return first, kwargs


def test_suite_writes_results(suite):
    result, _ = suite
    out = result.out
    assert result.n_computed == 2 and result.n_cached == 0 and not result.skipped
    for name in ("metrics.csv", "summary.csv", "README.md"):
        assert (out / name).exists()
    for name in (
        "scib_table.png",
        "scib_table_minmax.png",
        "umaps.png",
        "energy_by_cell_type.png",
    ):
        assert (out / "figures" / name).stat().st_size > 1_000
    metrics = pd.read_csv(out / "metrics.csv")
    assert set(metrics["method"]) == {"pca", "qbmvae_rbm"}
    tasks = set(metrics["task"])
    assert {"scib_raw", "scib", "scib_minmax", "classification", "trajectory", "rare"} <= tasks
    # Energy only for QBMVAE.
    assert set(metrics.loc[metrics["task"] == "energy", "method"]) == {"qbmvae_rbm"}
    bounded = metrics[metrics["task"].isin(["scib_raw", "scib", "scib_minmax", "classification"])]
    assert bounded["value"].between(0, 1).all()
    assert "KBET" not in set(metrics["metric"])
    for task, metric in [
        ("classification", "f1_weighted"),
        ("trajectory", "kendall_tau_scaled"),
        ("rare", "recall_mean_rare"),
        ("scib", "Total"),
    ]:
        values = metrics.query("task == @task and metric == @metric")["value"]
        assert len(values) == 2 and values.between(0, 1).all(), (task, metric)
    rho = metrics.query("task == 'energy' and metric.str.startswith('spearman')", engine="python")
    assert len(rho) == 3 and rho["value"].between(-1, 1).all()
    # Min-max scaled aggregates span [0, 1] across the runs compared.
    scaled = metrics.query("task == 'scib_minmax' and metric == 'Total'")["value"]
    assert scaled.min() >= 0 and scaled.max() <= 1
    readme = (out / "README.md").read_text()
    assert "qbmvae_rbm" in readme and "scIB Total" in readme and "kbet_per_label" in readme
    # The regime is named even though runs were trained (a run's Training once shadowed it).
    assert "training regime `matched`" in readme
    # Embeddings live in the cache, not next to the committable results.
    assert not list(out.glob("*.npy"))
    assert list((out / "runs").rglob("embedding.npy"))


def test_rerun_reuses_cache(suite, monkeypatch):
    result, kwargs = suite

    def boom(*args, **kwargs):
        raise AssertionError("fit called although the run is cached")

    patched = {name: dataclasses.replace(m, fit=boom) for name, m in METHODS.items()}
    monkeypatch.setattr("scqbm.benchmark._methods.METHODS", patched)
    again = run_suite(**kwargs)
    assert again.n_cached == 2 and again.n_computed == 0 and not again.skipped
    pd.testing.assert_frame_equal(again.metrics, result.metrics)
    # Metrics are cached per task: a subset of the tasks is all cached ...
    subset = run_suite(**{**kwargs, "tasks": ["classification"], "figures": False})
    assert subset.n_cached == 2 and subset.n_computed == 0 and not subset.skipped
    # ... and a task whose cached scores are gone is re-scored from the cached embeddings
    # without refitting.
    import json

    for metrics_file in (result.out / "runs").rglob("metrics.json"):
        saved = json.loads(metrics_file.read_text())
        del saved["tasks"]["classification"]
        metrics_file.write_text(json.dumps(saved))
    rescored = run_suite(**{**kwargs, "tasks": ["classification"], "figures": False})
    assert rescored.n_computed == 2 and not rescored.skipped
    # Only the cached runs are reported with only_cached; nothing is trained.
    cached_only = run_suite(
        **{**kwargs, "max_epochs": 4, "methods": ["pca", "qbmvae_rbm"], "only_cached": True}
    )
    assert "not run yet" in cached_only.skipped["qbmvae_rbm (seed 0)"]
    # A different training configuration is a new run (the patched fit is called).
    changed = run_suite(**{**kwargs, "max_epochs": 3, "methods": ["qbmvae_rbm"]})
    assert changed.n_computed == 0 and "qbmvae_rbm (seed 0)" in changed.skipped


def test_import_metrics_fills_in_runs_the_cache_lacks(suite, tmp_path):
    result, kwargs = suite
    earlier = result.metrics
    qbm = earlier[earlier["method"] == "qbmvae_rbm"]
    # An earlier page holds qbmvae_rbm seed 1, which the cache lacks, with its own raw scib
    # values and a stale derived Total, plus a seed-0 run that the cache must win over.
    seed1 = qbm.assign(seed=1)
    raw1 = seed1["task"] == "scib_raw"
    seed1.loc[raw1, "value"] = seed1.loc[raw1, "value"] * 0.5
    seed1.loc[seed1["task"] == "scib", "value"] = 99.0
    stale0 = qbm.assign(value=-1.0)
    path = tmp_path / "earlier_metrics.csv"
    pd.concat([stale0, seed1]).to_csv(path, index=False)

    merged = run_suite(
        **{
            **kwargs,
            "seeds": [0, 1],
            "out": tmp_path / "page",
            "cache_dir": result.out / "runs",
            "only_cached": True,
            "import_metrics": path,
            "figures": False,
        }
    )
    assert merged.n_computed == 0 and not merged.skipped  # seed 1 is not "not run yet"
    sources = {(m, s): src for m, s, src in merged.runs.itertuples(index=False)}
    assert sources == {
        ("pca", 0): "cached",
        ("qbmvae_rbm", 0): "cached",
        ("qbmvae_rbm", 1): "imported",
    }
    metrics = merged.metrics

    def values(frame, seed, task):
        sel = frame[(frame["method"] == "qbmvae_rbm") & (frame["seed"] == seed)]
        return sel[sel["task"] == task].set_index("metric")["value"].sort_index()

    # The cached seed-0 run wins; the imported seed 1 keeps its raw values ...
    pd.testing.assert_series_equal(values(metrics, 0, "scib_raw"), values(earlier, 0, "scib_raw"))
    pd.testing.assert_series_equal(
        values(metrics, 1, "scib_raw"), values(earlier, 0, "scib_raw") * 0.5
    )
    # ... and the aggregates, min-max scaling included, are recomputed over all three runs.
    raw = metrics[metrics["task"] == "scib_raw"]
    for task, scaled in (("scib", False), ("scib_minmax", True)):
        expected = aggregate_scib(raw, min_max_scale=scaled).set_index(["method", "seed"])
        got = metrics[(metrics["task"] == task) & (metrics["metric"] == "Total")]
        got = got.set_index(["method", "seed"])["value"]
        assert len(got) == 3
        np.testing.assert_allclose(got.sort_index(), expected["Total"].sort_index())
    assert (metrics["value"] != 99.0).all() and (metrics["value"] != -1.0).all()
    n_seeds = merged.summary.query("method == 'qbmvae_rbm' and task == 'fit'")["n_seeds"]
    assert (n_seeds == 2).all()
    readme = (merged.out / "README.md").read_text()
    assert "1 imported from" in readme and str(path) in readme
    assert "| qbmvae_rbm | 0 | 1 |" in readme  # seeds from the cache | imported

    other = tmp_path / "other_dataset.csv"
    pd.concat([stale0, seed1]).assign(dataset="kang").to_csv(other, index=False)
    with pytest.raises(ValueError, match="kang"):
        run_suite(
            **{
                **kwargs,
                "out": tmp_path / "page2",
                "cache_dir": result.out / "runs",
                "only_cached": True,
                "import_metrics": other,
                "figures": False,
            }
        )


def test_gaussian_ablation_matches_qbmvae_architecture():
    import scvi

    import scqbm

    adata = simulate(n_cells=100, n_genes=200, n_markers=10, seed=0)
    scqbm.QBMVAE.setup_anndata(adata, layer="counts", batch_key="batch")
    qbm = scqbm.QBMVAE(adata)
    scvi.model.SCVI.setup_anndata(adata, layer="counts", batch_key="batch")
    gauss = scvi.model.SCVI(adata, **gaussian_ablation_kwargs())

    def shapes(module, prefix):
        return {k: tuple(v.shape) for k, v in module.state_dict().items() if k.startswith(prefix)}

    # Same decoder and same encoder trunk, parameter for parameter.
    assert shapes(qbm.module, "decoder.") == shapes(gauss.module, "decoder.")
    assert shapes(qbm.module, "z_encoder.encoder.") == shapes(gauss.module, "z_encoder.encoder.")
    assert shapes(qbm.module, "z_encoder.encoder.")  # not vacuous
    assert qbm.module.gene_likelihood == gauss.module.gene_likelihood
    assert qbm.module.dispersion == gauss.module.dispersion
    # The latent head differs: Bernoulli logits versus Gaussian mean and variance.
    assert "z_encoder.logit_encoder.weight" in qbm.module.state_dict()
    assert "z_encoder.mean_encoder.weight" in gauss.module.state_dict()


def test_aggregate_scib_matches_benchmarker_rules():
    raw = pd.DataFrame(
        [
            ("a", 0, "m1", "Bio conservation", 0.2),
            ("a", 0, "m2", "Bio conservation", 0.6),
            ("a", 0, "b1", "Batch correction", 0.5),
            ("b", 0, "m1", "Bio conservation", 0.4),
            ("b", 0, "m2", "Bio conservation", 0.6),
            ("b", 0, "b1", "Batch correction", 0.1),
        ],
        columns=["method", "seed", "metric", "metric_type", "value"],
    )
    plain = aggregate_scib(raw, min_max_scale=False).set_index("method")
    assert plain.at["a", "Bio conservation"] == pytest.approx(0.4)
    assert plain.at["a", "Total"] == pytest.approx(0.4 * 0.5 + 0.6 * 0.4)
    scaled = aggregate_scib(raw, min_max_scale=True).set_index("method")
    # m1 -> a: 0, b: 1; m2 constant -> 0 (as sklearn's MinMaxScaler); b1 -> a: 1, b: 0.
    assert scaled.at["a", "Bio conservation"] == pytest.approx(0.0)
    assert scaled.at["b", "Bio conservation"] == pytest.approx(0.5)
    assert scaled.at["a", "Total"] == pytest.approx(0.4)
    assert scaled.at["b", "Total"] == pytest.approx(0.3)


def test_best_matching_cluster():
    clusters = np.array(["0"] * 6 + ["1"] * 4)
    members = np.array([0, 0, 0, 0, 0, 1, 1, 1, 1, 0], dtype=bool)
    scores = best_matching_cluster(clusters, members)
    assert scores["recall"] == pytest.approx(0.75)
    assert scores["precision"] == pytest.approx(0.75)
    assert scores["f1"] == pytest.approx(0.75)


def test_marker_ranks_orders_by_lfc_and_bayes_factor():
    from scqbm.benchmark import marker_ranks

    de = pd.DataFrame(
        {
            "lfc_mean": [3.0, 1.0, 2.0, -4.0, 2.0],
            "bayes_factor": [0.5, 6.0, 2.0, 9.0, 1.0],
            "is_de_fdr_0.05": [True, True, False, True, False],
        },
        index=["A", "B", "C", "D", "E"],
    )
    ranks = marker_ranks(de, ["C", "B", "MISSING"])
    # By lfc_mean (decreasing): A 1, C and E tie at 2, B 4, D 5.
    assert ranks["rank_lfc[C]"] == 2 and ranks["rank_lfc[B]"] == 4
    # By Bayes factor (decreasing): D 1, B 2, C 3, E 4, A 5 (down-regulated D counts too).
    assert ranks["rank_bf[B]"] == 2 and ranks["rank_bf[C]"] == 3
    assert ranks["rank_lfc"] == 2 and ranks["rank_bf"] == 2
    assert ranks["n_fdr"] == 3
    assert not any("MISSING" in k for k in ranks)


def test_training_regimes_and_resume(tmp_path, monkeypatch):
    import json

    from scqbm.benchmark import Training
    from scqbm.benchmark._methods import _fit_scvi
    from scqbm.benchmark._training import train_kwargs_of

    assert train_kwargs_of(Training("default", None), None) == {"enable_progress_bar": False}
    assert train_kwargs_of(Training("early_stopping", None), None)["early_stopping"] is True
    matched = train_kwargs_of(Training("matched", 7), {"lr": 1e-3})
    assert matched["max_epochs"] == 7 and matched["plan_kwargs"] == {"lr": 1e-3}
    # A variant's own train arguments win over the regime's batch size, in every regime.
    assert train_kwargs_of(Training("matched", 7), None, {"batch_size": 256})["batch_size"] == 256
    assert train_kwargs_of(Training("default", None), None, {"batch_size": 64}) == {
        "enable_progress_bar": False,
        "batch_size": 64,
    }
    with pytest.raises(ValueError, match="max_epochs belongs to the training regime"):
        train_kwargs_of(Training("default", None), None, {"max_epochs": 5})
    with pytest.raises(ValueError, match="regime"):
        Training("converged")

    data = simulate(n_cells=120, n_genes=60, n_markers=5, seed=0)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    # Stop after 2 epochs with the state kept, as a killed run leaves it.
    monkeypatch.setattr("scqbm.benchmark._training.clear_run_state", lambda training: None)
    first = Training("matched", 2, run_dir=run_dir, checkpoint_every=1)
    _fit_scvi(data, "batch", 0, first)
    assert (run_dir / "last.ckpt").exists()
    assert json.loads((run_dir / "train_state.json").read_text())["epoch"] == 1
    # The continued run restores the checkpoint (epoch 1) and trains epochs 1 and 2 only.
    monkeypatch.undo()
    out = _fit_scvi(data, "batch", 0, Training("matched", 3, run_dir=run_dir, checkpoint_every=1))
    assert out.info["resumed_at_epoch"] == 1
    assert list(out.history.index) == [0, 1, 2]
    assert out.info["epochs"] == 3
    assert not (run_dir / "last.ckpt").exists() and (run_dir / "model" / "model.pt").exists()


def test_de_task_scores_a_trained_model_on_its_markers():
    import scvi

    from scqbm import QBMVAE
    from scqbm.benchmark import BenchmarkDataset, model_de_metrics
    from scqbm.benchmark._methods import _model_adata

    adata = simulate(n_cells=300, n_genes=80, n_markers=6, marker_lfc=3.0, seed=0)
    markers = {
        t: list(adata.var_names[adata.var["program"] == f"marker_{t}"][:2])
        for t in ("type_0", "type_1")
    }
    data = BenchmarkDataset(
        name="toy",
        adata=adata,
        batch_key="batch",
        label_key="cell_type",
        description="toy",
        markers=markers,
    )
    scvi.settings.seed = 0
    work = _model_adata(adata)
    QBMVAE.setup_anndata(work, batch_key="batch")
    model = QBMVAE(work, n_latent=8)
    model.train(max_epochs=40, batch_size=64, enable_progress_bar=False)
    first = model_de_metrics(model, data, seed=3)
    # Seeded: the same model scores the same twice.
    assert model_de_metrics(model, data, seed=3) == first
    for t in markers:
        # Strong simulated markers lead their type's 1-vs-all comparison.
        assert first[f"rank_lfc[{t}]"] <= 10 and first[f"rank_bf[{t}]"] <= 10
        assert first[f"n_fdr[{t}]"] >= 1
    types = adata.obs["cell_type"].unique()
    assert first["n_fdr_total"] == sum(first[f"n_fdr[{t}]"] for t in types)
    assert first["n_types_top20_lfc"] == 2
