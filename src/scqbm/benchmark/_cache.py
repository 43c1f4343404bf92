"""The per-run cache of the suite: folders, embeddings, model outputs and their configs."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd

from ._methods import MethodOutput

__all__ = ["digest", "load_output", "method_dir", "regime_dir", "run_dir_of", "save_output"]


def digest(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:10]


def method_dir(spec: str) -> str:
    """Folder name of a method spec (variants get a readable name plus a digest)."""
    if spec.isidentifier():
        return spec
    readable = "".join(c if c.isalnum() or c in "_-=." else "_" for c in spec).strip("_")
    return f"{readable[:60]}-{digest(spec)}"


def regime_dir(training_config: dict | None) -> str:
    """Cache folder of a training regime (``untrained`` for PCA, Harmony, Scanorama)."""
    if not training_config:
        return "untrained"
    if training_config["training"] == "matched":
        return f"matched-{training_config['max_epochs']}ep"
    return training_config["training"]


def run_dir_of(
    cache: Path, dataset_tag: str, method: str, seed: int, training_config: dict | None = None
) -> Path:
    return cache / dataset_tag / regime_dir(training_config) / method_dir(method) / f"seed{seed}"


def load_output(run_dir: Path, fit_config: dict) -> MethodOutput | None:
    config_file = run_dir / "fit.json"
    if not (config_file.exists() and (run_dir / "embedding.npy").exists()):
        return None
    saved = json.loads(config_file.read_text())
    if saved.get("config") != json.loads(json.dumps(fit_config, default=str)):
        return None
    extras = {}
    if (run_dir / "extras.npz").exists():
        with np.load(run_dir / "extras.npz") as data:
            extras = {k: data[k] for k in data.files}
    history = None
    if (run_dir / "history.csv").exists():
        history = pd.read_csv(run_dir / "history.csv", index_col="epoch")
    return MethodOutput(
        np.load(run_dir / "embedding.npy"), saved["seconds"], extras, saved["info"], history
    )


def save_output(run_dir: Path, fit_config: dict, output: MethodOutput) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    np.save(run_dir / "embedding.npy", output.embedding)
    if output.extras:
        np.savez(run_dir / "extras.npz", **output.extras)
    if output.history is not None and len(output.history):
        output.history.to_csv(run_dir / "history.csv")
    (run_dir / "fit.json").write_text(
        json.dumps(
            {"config": fit_config, "seconds": output.seconds, "info": output.info},
            indent=2,
            default=str,
        )
    )
