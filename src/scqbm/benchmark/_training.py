"""Training regimes of the suite and the per-run training state (checkpoints, history, ETA)."""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

__all__ = ["REGIMES", "Training", "train_kwargs_of"]

#: ``default``: ``Model(adata).train()`` exactly (scvi's epoch heuristic, 400-epoch KL warm-up,
#: its batch size); ``matched``: the same ``max_epochs`` and batch size 128 for every model;
#: ``early_stopping``: the defaults plus ``early_stopping=True`` (validation ELBO, patience 45).
REGIMES = ("default", "matched", "early_stopping")


@dataclass(frozen=True)
class Training:
    """How the neural methods of a suite run are trained.

    Attributes
    ----------
    regime
        One of :data:`REGIMES`.
    max_epochs
        Epochs of the ``matched`` regime (ignored by the others).
    run_dir
        Folder of the run: checkpoints, the per-epoch history and the saved model go there.
    progress
        Print epoch, elapsed time and ETA to stderr every ``progress_every`` epochs.
    label
        Prefix of the progress lines.
    checkpoint_every
        Epochs between checkpoints (a killed run resumes from the last one).

    """

    regime: str = "matched"
    max_epochs: int | None = 20
    run_dir: Path | None = None
    progress: bool = False
    label: str = ""
    checkpoint_every: int = 10
    progress_every: int = 10

    def __post_init__(self):
        if self.regime not in REGIMES:
            raise ValueError(f"Unknown training regime {self.regime!r}; choose from {REGIMES}.")
        if self.regime == "matched" and not self.max_epochs:
            raise ValueError("The 'matched' training regime needs max_epochs.")

    def config(self) -> dict:
        """What identifies the regime in the cache (``max_epochs`` only where it is used)."""
        if self.regime == "matched":
            return {"training": "matched", "max_epochs": self.max_epochs}
        return {"training": self.regime}


def train_kwargs_of(
    training: Training, plan_kwargs: dict | None, train_kwargs: dict | None = None
) -> dict:
    """Keyword arguments of ``model.train`` for a regime (before callbacks).

    ``default`` and ``early_stopping`` pass nothing that changes training beyond
    ``early_stopping``: scvi's heuristic picks ``max_epochs``, and batch size, train split and
    KL warm-up are each model's own defaults. Method variants with ``plan_kwargs`` or
    ``train_kwargs`` (for example ``{'batch_size': 256}``) keep them in every regime (they are
    part of the variant, so they override the regime's ``batch_size``).
    """
    kwargs: dict = {"enable_progress_bar": False}
    if plan_kwargs is not None:
        kwargs["plan_kwargs"] = plan_kwargs
    if training.regime == "matched":
        kwargs.update(max_epochs=training.max_epochs, batch_size=128)
    elif training.regime == "early_stopping":
        kwargs["early_stopping"] = True
    if train_kwargs:
        reserved = {"plan_kwargs", "callbacks", "ckpt_path", "max_epochs"} & set(train_kwargs)
        if reserved:
            raise ValueError(
                f"A method variant's train_kwargs cannot set {sorted(reserved)}: max_epochs "
                "belongs to the training regime, plan_kwargs is its own variant argument, "
                "callbacks and checkpoints to the suite."
            )
        kwargs.update(train_kwargs)
    return kwargs


def _history_frame(history: dict) -> pd.DataFrame:
    frames = [df for df in history.values() if isinstance(df, pd.DataFrame) and len(df)]
    if not frames:
        return pd.DataFrame()
    out = pd.concat(frames, axis=1)
    out.index.name = "epoch"
    return out


def make_callback(training: Training, max_epochs: int):
    """A Lightning callback that checkpoints, records the history and prints an ETA."""
    from lightning.pytorch.callbacks import Callback

    run_dir = Path(training.run_dir)
    state_file = run_dir / "train_state.json"
    partial_file = run_dir / "history_partial.csv"
    state = json.loads(state_file.read_text()) if state_file.exists() else {}
    earlier = pd.read_csv(partial_file, index_col="epoch") if partial_file.exists() else None

    class _RunState(Callback):
        def __init__(self):
            self.start = time.perf_counter()
            self.seconds_before = float(state.get("seconds", 0.0))
            self.first_epoch = None

        def seconds(self) -> float:
            return self.seconds_before + time.perf_counter() - self.start

        def history(self, trainer) -> pd.DataFrame:
            current = _history_frame(getattr(trainer.logger, "history", {}) or {})
            if earlier is None or self.first_epoch is None:
                return current
            kept = earlier[earlier.index < self.first_epoch]
            return pd.concat([kept, current]).sort_index()

        def on_train_epoch_start(self, trainer, pl_module):
            if self.first_epoch is None:
                self.first_epoch = trainer.current_epoch
            epoch = trainer.current_epoch  # epochs done so far
            if epoch > self.first_epoch:
                self.history(trainer).to_csv(partial_file)
            if training.progress and epoch % training.progress_every == 0 and epoch:
                elapsed = self.seconds()
                eta = elapsed / epoch * (max_epochs - epoch)
                print(
                    f"[{training.label}] epoch {epoch}/{max_epochs}, {elapsed / 60:.1f} min, "
                    f"ETA {eta / 60:.1f} min",
                    file=sys.stderr,
                    flush=True,
                )

        def on_train_epoch_end(self, trainer, pl_module):
            epoch = trainer.current_epoch + 1
            if epoch % training.checkpoint_every == 0 and epoch < max_epochs:
                tmp = run_dir / "last.ckpt.tmp"
                trainer.save_checkpoint(tmp)
                os.replace(tmp, run_dir / "last.ckpt")
                state_file.write_text(json.dumps({"epoch": epoch, "seconds": self.seconds()}))

    return _RunState()


def resume_checkpoint(training: Training) -> str | None:
    """Path of the checkpoint to resume from, if the run was interrupted."""
    if training.run_dir is None:
        return None
    ckpt = Path(training.run_dir) / "last.ckpt"
    return str(ckpt) if ckpt.exists() else None


def clear_run_state(training: Training) -> None:
    """Remove checkpoints and partial history once the run's output is saved."""
    if training.run_dir is None:
        return
    for name in ("last.ckpt", "last.ckpt.tmp", "train_state.json", "history_partial.csv"):
        path = Path(training.run_dir) / name
        if path.exists():
            path.unlink()
