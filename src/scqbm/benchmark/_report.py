"""Reporting: CSV files, the markdown summary and the figures of a suite run."""

from __future__ import annotations

import os
import platform
import sys
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import pandas as pd

__all__ = ["HEADLINE", "write_report"]

#: (task, metric, column title) of the headline table; all are "higher is better".
HEADLINE = [
    ("scib", "Batch correction", "scIB batch"),
    ("scib", "Bio conservation", "scIB bio"),
    ("scib", "Total", "scIB Total"),
    ("scib_minmax", "Batch correction", "batch (min-max)"),
    ("scib_minmax", "Bio conservation", "bio (min-max)"),
    ("scib_minmax", "Total", "Total (min-max)"),
    ("classification", "accuracy", "accuracy"),
    ("classification", "f1_weighted", "F1 (weighted)"),
    ("trajectory", "kendall_tau_scaled", "DPT (tau+1)/2"),
    ("rare", "recall_mean_rare", "rare recall"),
    ("rare", "f1_mean_rare", "rare F1"),
    ("rare", "subsample_0.002_f1", "F1 at 0.2%"),
]

_BASELINES = ("scvi", "gaussian_vae", "scvi_default")


def _pkg_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def _fmt(mean: float, sd: float, n: int) -> str:
    if not np.isfinite(mean):
        return "n/a"
    if n > 1 and np.isfinite(sd):
        return f"{mean:.3f} ± {sd:.3f}"
    return f"{mean:.3f}"


def _pivot(summary: pd.DataFrame, methods: list[str], metrics: list[tuple[str, str, str]]):
    table = pd.DataFrame(index=methods)
    for task, metric, title in metrics:
        rows = summary[(summary["task"] == task) & (summary["metric"] == metric)]
        if rows.empty:
            continue
        rows = rows.set_index("method")
        table[title] = [
            _fmt(rows.at[m, "mean"], rows.at[m, "std"], int(rows.at[m, "n_seeds"]))
            if m in rows.index
            else "–"
            for m in methods
        ]
    table.insert(0, "seeds", [_n_seeds(summary, m) for m in methods])
    return table


def _n_seeds(summary: pd.DataFrame, method: str) -> int:
    rows = summary[(summary["method"] == method) & (summary["task"] == "fit")]
    return int(rows["n_seeds"].max()) if len(rows) else 0


def _markdown_table(table: pd.DataFrame, index_name: str = "method") -> str:
    cols = [index_name, *map(str, table.columns)]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for idx, row in table.iterrows():
        lines.append("| " + " | ".join([str(idx), *map(str, row.to_numpy())]) + " |")
    return "\n".join(lines)


def _task_table(summary: pd.DataFrame, task: str, methods: list[str]) -> pd.DataFrame | None:
    rows = summary[summary["task"] == task]
    if rows.empty:
        return None
    metrics = list(dict.fromkeys(rows["metric"]))
    return _pivot(summary, methods, [(task, m, m) for m in metrics]).drop(columns="seeds")


def _comparison(metrics: pd.DataFrame, methods: list[str]) -> pd.DataFrame:
    """QBMVAE variants minus each Gaussian baseline on the headline metrics (mean over seeds)."""
    qbm = [m for m in methods if m.startswith("qbmvae")]
    base = [m for m in _BASELINES if m in methods]
    records = []
    for task, metric, title in HEADLINE:
        sel = metrics[(metrics["task"] == task) & (metrics["metric"] == metric)]
        if sel.empty:
            continue
        means = sel.groupby("method")["value"].mean()
        sds = sel.groupby("method")["value"].std()
        for q in qbm:
            for b in base:
                if q not in means or b not in means:
                    continue
                diff = means[q] - means[b]
                noise = np.nansum([sds.get(q, np.nan), sds.get(b, np.nan)])
                verdict = "win" if diff > 0 else "loss" if diff < 0 else "tie"
                if noise > 0 and abs(diff) < noise:
                    verdict += " (within 1 sd)"
                records.append(
                    {
                        "metric": title,
                        "QBMVAE": q,
                        "vs": b,
                        "difference": f"{diff:+.3f}",
                        "verdict": verdict,
                    }
                )
    return pd.DataFrame(records)


# --------------------------------------------------------------------- figures
def _figure_scib(metrics: pd.DataFrame, methods: list[str], path: Path, scaled: bool) -> None:
    import matplotlib.pyplot as plt

    raw = metrics[metrics["task"] == "scib_raw"]
    if raw.empty:
        return
    task = "scib_minmax" if scaled else "scib"
    agg = metrics[metrics["task"] == task].pivot_table(
        index="method", columns="metric", values="value"
    )
    if scaled:
        wide = raw.pivot_table(index=["method", "seed"], columns="metric", values="value")
        span = (wide.max() - wide.min()).replace(0.0, np.nan)
        wide = ((wide - wide.min()) / span).fillna(0.0)
        values = wide.groupby(level="method").mean()
    else:
        values = raw.pivot_table(index="method", columns="metric", values="value")
    kinds = raw.drop_duplicates("metric").set_index("metric")["metric_type"]
    order = sorted(values.columns, key=lambda c: (kinds[c] != "Bio conservation", c))
    values = values[order].join(agg)
    rows = [m for m in methods if m in values.index]
    sort_col = "Total" if "Total" in values else "Bio conservation"
    rows = sorted(rows, key=lambda m: -values.at[m, sort_col])
    values = values.loc[rows]
    colour = (values - values.min()) / (values.max() - values.min()).replace(0.0, np.nan)
    fig, ax = plt.subplots(figsize=(1.0 * values.shape[1] + 2.5, 0.55 * len(rows) + 1.8))
    ax.imshow(
        colour.fillna(0.5).to_numpy(dtype=float), cmap="PRGn", vmin=-0.3, vmax=1.3, aspect="auto"
    )
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            ax.text(j, i, f"{values.iat[i, j]:.2f}", ha="center", va="center", fontsize=8)
    n_agg = agg.shape[1]
    ax.axvline(values.shape[1] - n_agg - 0.5, color="black", lw=1.5)
    ax.set_xticks(range(values.shape[1]))
    ax.set_xticklabels([c.replace(" ", "\n", 1) for c in values.columns], fontsize=8)
    ax.xaxis.tick_top()
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels(rows)
    ax.set_title(
        f"scib-metrics {_pkg_version('scib-metrics')}, mean over seeds, "
        f"min-max scaling {'on (across all runs)' if scaled else 'off'}",
        fontsize=9,
        pad=30,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _first_cached(run_root, methods: list[str], seeds: list[int], name: str) -> dict:
    """``{method: (seed, path)}`` of the first seed of each method whose run has file ``name``."""
    found = {}
    for m in methods:
        for seed in seeds:
            f = run_root(m) / f"seed{seed}" / name
            if f.exists():
                found[m] = (seed, f)
                break
    return found


def _figure_umaps(data, run_root: Path, methods: list[str], seeds: list[int], path: Path) -> bool:
    import matplotlib.pyplot as plt

    coords = {
        f"{m} (seed {seed})": np.load(f)
        for m, (seed, f) in _first_cached(run_root, methods, seeds, "umap.npy").items()
    }
    if not coords:
        return False
    keys = [k for k in (data.batch_key, data.label_key) if k is not None]
    fig, axes = plt.subplots(
        len(coords), len(keys), figsize=(4.2 * len(keys) + 1.8, 3.6 * len(coords)), squeeze=False
    )
    rng = np.random.default_rng(0)
    order = rng.permutation(data.adata.n_obs)
    for i, (m, xy) in enumerate(coords.items()):
        for j, key in enumerate(keys):
            ax = axes[i, j]
            cats = data.adata.obs[key].astype("category")
            palette = plt.get_cmap("tab10" if len(cats.cat.categories) <= 10 else "tab20")
            codes = cats.cat.codes.to_numpy()
            ax.scatter(
                xy[order, 0],
                xy[order, 1],
                c=[palette(c % palette.N) for c in codes[order]],
                s=1.5,
                linewidths=0,
                rasterized=True,
            )
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{m}: {key}", fontsize=9)
            if i == 0:
                handles = [
                    plt.Line2D([], [], marker="o", ls="", color=palette(k % palette.N), label=c)
                    for k, c in enumerate(cats.cat.categories)
                ]
                ax.legend(
                    handles=handles,
                    fontsize=6,
                    markerscale=0.8,
                    loc="upper left",
                    bbox_to_anchor=(1.0, 1.0),
                    frameon=False,
                )
    fig.tight_layout()
    fig.savefig(path, dpi=60 if data.adata.n_obs > 5_000 else 80)
    plt.close(fig)
    return True


def _figure_energy(data, run_root: Path, methods: list[str], seeds: list[int], path: Path) -> bool:
    import matplotlib.pyplot as plt

    energies = {}
    for m in methods:
        for seed in seeds:
            f = run_root(m) / f"seed{seed}" / "extras.npz"
            if not f.exists():
                continue
            with np.load(f) as extras:
                if "energy" in extras.files:
                    energies[f"{m} (seed {seed})"] = extras["energy"]
                    break
    if not energies:
        return False
    labels = data.adata.obs[data.label_key].astype(str).to_numpy()
    cats = sorted(np.unique(labels))
    fig, axes = plt.subplots(
        1, len(energies), figsize=(0.6 * len(cats) * len(energies) + 2, 4), squeeze=False
    )
    for ax, (m, energy) in zip(axes[0], energies.items(), strict=True):
        ax.boxplot([energy[labels == c] for c in cats], showfliers=False)
        ax.set_xticks(range(1, len(cats) + 1))
        ax.set_xticklabels(cats, rotation=60, ha="right", fontsize=8)
        ax.set_ylabel("prior energy E_q[E(z)] (low = probable)")
        ax.set_title(m, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _regime_sentence(training: str, max_epochs: int, metrics: pd.DataFrame) -> str:
    epochs = metrics[(metrics["task"] == "fit") & (metrics["metric"] == "epochs")]["value"]
    ran = f" (epochs run: {int(epochs.min())}-{int(epochs.max())})" if len(epochs) else ""
    if training == "matched":
        return (
            f"neural methods trained for {max_epochs} epochs (batch size 128, scvi-tools "
            "defaults otherwise, KL warm-up included)."
        )
    if training == "default":
        return (
            "each neural method constructed and trained with its own defaults, exactly "
            "`Model(adata)` + `model.train()` (scvi-tools' epoch heuristic, 400-epoch KL "
            f"warm-up, batch size 128, 90% train split){ran}."
        )
    return (
        "each model's defaults plus `early_stopping=True` (validation ELBO, patience 45, "
        f"at most scvi-tools' heuristic epochs){ran}."
    )


def _energy_per_seed(metrics: pd.DataFrame) -> pd.DataFrame | None:
    rows = metrics[(metrics["task"] == "energy") & metrics["metric"].str.startswith("spearman")]
    if rows.empty:
        return None
    table = rows.pivot_table(index=["method", "seed"], columns="metric", values="value")
    table.columns = [c.replace("spearman_energy_vs_", "rho vs ") for c in table.columns]
    table.index = [f"{m}, {s}" for m, s in table.index]
    return table.map(lambda v: f"{v:+.3f}")


#: (history column, panel title) of the training-curve figure.
CURVES = [
    ("elbo_train", "negative ELBO (train)"),
    ("elbo_validation", "negative ELBO (validation)"),
    ("reconstruction_loss_train", "reconstruction loss (train)"),
    ("kl_local_train", "KL(q(z|x) || p(z)) (train)"),
    ("log_z", "log Z of the prior (QBMVAE)"),
]


def _figure_curves(run_root, methods: list[str], seeds: list[int], path: Path) -> bool:
    """Per-epoch training curves (ELBO, reconstruction, KL, log Z) of the neural methods."""
    import matplotlib.pyplot as plt

    histories = {
        f"{m} (seed {seed})": pd.read_csv(f, index_col="epoch")
        for m, (seed, f) in _first_cached(run_root, methods, seeds, "history.csv").items()
    }
    panels = [(c, t) for c, t in CURVES if any(c in h for h in histories.values())]
    if not histories or not panels:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.4), squeeze=False)
    # One colour per method in every panel (log Z exists for QBMVAE only; a panel's own colour
    # cycle would give its curves the colours of other methods in the legend).
    colours = {m: f"C{i % 10}" for i, m in enumerate(histories)}
    for ax, (column, title) in zip(axes[0], panels, strict=True):
        for m, h in histories.items():
            if column in h and h[column].notna().any():
                series = h[column].dropna()
                ax.plot(series.index, series.to_numpy(), label=m, lw=1.2, color=colours[m])
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("epoch")
        if column != "log_z":
            finite = pd.concat([h[column] for h in histories.values() if column in h]).dropna()
            if len(finite):  # the first epochs would squash the rest
                ax.set_ylim(finite.quantile(0.0), finite.quantile(0.97))
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


# ---------------------------------------------------------------------- report
def write_report(
    result,
    data,
    run_root: Path,
    methods: list[str],
    seeds: list[int],
    max_epochs: int,
    command: str | None,
    figures: bool,
    seconds: float,
    scib_exclude: list[str] | None = None,
    training: str = "matched",
) -> list[Path]:
    """Write ``metrics.csv``, ``summary.csv``, ``README.md`` and ``figures/*.png``."""
    from ._methods import resolve_method

    out = result.out
    files = []
    metrics_csv = out / "metrics.csv"
    result.metrics.to_csv(metrics_csv, index=False)
    summary_csv = out / "summary.csv"
    result.summary.to_csv(summary_csv, index=False)
    files += [metrics_csv, summary_csv]

    figure_lines = []
    if figures:
        fig_dir = out / "figures"
        fig_dir.mkdir(exist_ok=True)
        for scaled in (False, True):
            path = fig_dir / f"scib_table{'_minmax' if scaled else ''}.png"
            _figure_scib(result.metrics, methods, path, scaled)
            if path.exists():
                files.append(path)
                figure_lines.append(
                    f"![scib-metrics table, min-max {'on' if scaled else 'off'}]"
                    f"(figures/{path.name})"
                )
        path = fig_dir / "umaps.png"
        if _figure_umaps(data, run_root, methods, seeds, path):
            files.append(path)
            figure_lines.append(
                "![UMAPs by batch and cell type (first seed of each method with a cached run)]"
                f"(figures/{path.name})"
            )
        path = fig_dir / "training_curves.png"
        if _figure_curves(run_root, methods, seeds, path):
            files.append(path)
            figure_lines.append(
                "![Training curves per epoch (first seed of each method with a cached run)]"
                f"(figures/{path.name})"
            )
        path = fig_dir / "energy_by_cell_type.png"
        if _figure_energy(data, run_root, methods, seeds, path):
            files.append(path)
            figure_lines.append(f"![QBMVAE prior energy by cell type](figures/{path.name})")

    summary = result.summary
    runs = getattr(result, "runs", None)
    imported_from = getattr(result, "imported_from", None)
    n_imported = int((runs["source"] == "imported").sum()) if runs is not None else 0
    imported_note = (
        f", {n_imported} imported from `{imported_from}`" if imported_from is not None else ""
    )
    lines = [
        f"# scqbm benchmark: {data.name}",
        "",
        f"Generated {datetime.now(UTC):%Y-%m-%d %H:%M} UTC in {seconds / 60:.1f} min "
        f"({result.n_computed} runs computed, {result.n_cached} reused from the cache"
        f"{imported_note}).",
        "",
        "```",
        command or "(Python API call; no command line recorded)",
        "```",
        "",
        f"- Data: {data.description}.",
        f"- Seeds: {seeds}; training regime `{training}`: "
        + _regime_sentence(training, max_epochs, result.metrics),
        f"- Machine: {platform.machine()}, {os.cpu_count()} CPU cores, torch threads "
        f"{_torch_threads()}, Python {sys.version.split()[0]}; scqbm {_pkg_version('scqbm')}, "
        f"scvi-tools "
        f"{_pkg_version('scvi-tools')}, scib-metrics {_pkg_version('scib-metrics')}, "
        f"torch {_pkg_version('torch')}, scanpy {_pkg_version('scanpy')}.",
        "- Values are mean ± sd over seeds (sd with ddof 1); methods whose embedding does not "
        "depend on the seed ran once. Every value of every run is in `metrics.csv`.",
        "",
        "## Methods",
        "",
    ]
    for m in methods:
        method, kwargs = resolve_method(m)
        extra = f" with {kwargs}" if kwargs else ""
        lines.append(f"- `{m}`: {method.description}{extra}.")
    if runs is not None and len(runs):
        lines += ["", "## Runs", ""]
        if imported_from is not None:
            lines += [
                f"Runs marked *imported* are read from `{imported_from}` (the per-run values of "
                "an earlier page, whose cached embeddings are gone): their raw metrics are "
                "reused as they are, and the scIB aggregates, min-max scaling and means are "
                "recomputed over every run of this page. Runs from the cache were trained "
                "(*computed*) by this command or by an earlier one with the same "
                "configuration (*cached*). The figures other than the scIB tables can only "
                "draw runs of the cache.",
                "",
            ]
        labels = {"computed": "computed now", "cached": "from the cache", "imported": "imported"}
        table = pd.DataFrame(
            {
                label: [
                    ", ".join(
                        str(s)
                        for s in runs.loc[
                            (runs["method"] == m) & (runs["source"] == source), "seed"
                        ]
                    )
                    or "–"
                    for m in methods
                ]
                for source, label in labels.items()
                if (runs["source"] == source).any()
            },
            index=methods,
        )
        lines += ["Seeds of each method by where the run comes from:", ""]
        lines += [_markdown_table(table)]
    if result.skipped:
        lines += ["", "Not run:", ""]
        lines += [f"- `{m}`: {reason}" for m, reason in result.skipped.items()]
    lines += [
        "",
        "## Headline",
        "",
        "scIB: scib-metrics `Benchmarker` (default bio-conservation and batch-correction "
        "suites, unintegrated PCA as the pre-integrated embedding), Total = 0.4 batch + 0.6 "
        "bio. *Without* min-max scaling the raw metric values are averaged (comparable to the "
        "reference numbers of the same scib-metrics version); *with* min-max scaling each "
        "metric is first scaled to [0, 1] across all runs in this table (every method and "
        "seed), as `Benchmarker.get_results(min_max_scale=True)` does across embeddings, so "
        "those values depend on which methods are compared."
        + (
            f" **Left out of the scib suites: {', '.join(scib_exclude)}** (totals are not "
            "comparable to full-suite totals)."
            if scib_exclude
            else ""
        ),
        "",
        _markdown_table(_pivot(summary, methods, HEADLINE)),
        "",
    ]
    comparison = _comparison(result.metrics, methods)
    if not comparison.empty:
        lines += [
            "## QBMVAE against the Gaussian-prior baselines",
            "",
            "Difference of means (QBMVAE minus baseline) on the headline metrics; "
            "'within 1 sd' when the difference is smaller than the sum of the two standard "
            "deviations over seeds.",
            "",
            _markdown_table(comparison.set_index("metric"), "metric"),
            "",
        ]
    sections = [
        (
            "classification",
            "Classification (logistic regression, 5-fold stratified CV on the "
            "frozen embedding; fold means; `f1[...]`: the rarest types)",
        ),
        (
            "trajectory",
            "Trajectory (diffusion pseudotime on the embedding vs ground truth, "
            "Kendall tau rescaled to (tau + 1) / 2)",
        ),
        (
            "rare",
            "Rare cells (best-matching Leiden cluster, resolution 1; `subsample_f_*`: "
            f"`{data.subsample_label}` subsampled to a fraction f of the cells, frozen embedding)",
        ),
        (
            "energy",
            "Prior energy (QBMVAE): per-cell E_q[E(z)], Spearman correlation with "
            "the per-cell reconstruction log-likelihood, KL and ELBO, mean by cell type",
        ),
        (
            "de",
            "Differential expression (scvi-tools 1-vs-all DE, `mode='change'`, on the trained "
            "model; `rank_lfc[T]` / `rank_bf[T]`: best rank of type T's canonical markers by "
            "`lfc_mean` / Bayes factor, 1 = top; `n_fdr[T]`: genes at FDR 0.05)",
        ),
        ("scib_raw", "scib-metrics raw values"),
        ("fit", "Fit (seconds of training + embedding, epochs, log Z)"),
    ]
    for task, title in sections:
        table = _task_table(summary, task, methods)
        if table is None:
            continue
        table = table.loc[(table != "–").any(axis=1), (table != "–").any()]
        if task in ("rare", "energy", "classification", "de") and table.shape[1] > 8:
            table = table.T
            lines += [f"## {title}", "", _markdown_table(table, "metric"), ""]
        else:
            lines += [f"## {title}", "", _markdown_table(table), ""]
    per_seed = _energy_per_seed(result.metrics)
    if per_seed is not None:
        lines += [
            "## Energy claim per seed",
            "",
            "Spearman correlation of a cell's prior energy with its reconstruction "
            "log-likelihood, KL term and ELBO, for each seed (the paper reports a strong "
            "negative correlation with the log-likelihood).",
            "",
            _markdown_table(per_seed, "method, seed"),
            "",
        ]
    if figure_lines:
        lines += ["## Figures", "", *[f"{f}\n" for f in figure_lines]]
    readme = out / "README.md"
    readme.write_text("\n".join(lines))
    files.append(readme)
    return files
