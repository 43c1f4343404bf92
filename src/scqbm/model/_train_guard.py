"""A failed ``train()`` leaves the model as it was before the call.

Lightning updates the weights in place, step by step; when training stops with an error (a
sampler failure under ``on_failure="raise"``, a NaN, an interrupted data loader) the module
would keep half-trained weights, chains and log Z while ``is_trained_`` still says False,
and a second ``train()`` would silently continue from them. :func:`restore_on_failure`
snapshots the module's ``state_dict`` (parameters and buffers: prior, persistent chains,
log Z estimate) and its samplers' random state (a seeded sampler's generator or seed
stream) before training, puts them back on an exception, keeps the history logged up
to the failure in ``model.history``, and re-raises with a note that says so.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Iterator

import pandas as pd

logger = logging.getLogger(__name__)


class _HistoryOnFailure:
    """Lightning callback that keeps the logger's history when training raises."""

    def __new__(cls, sink: dict):
        from lightning.pytorch.callbacks import Callback

        class _Keep(Callback):
            def on_exception(self, trainer, pl_module, exception) -> None:
                history = getattr(trainer.logger, "history", None)
                if history:
                    sink.update({k: v.copy() for k, v in history.items()})

        return _Keep()


def _merged_history(before, partial: dict):
    """Earlier history with the failed call's rows appended (as scvi does after a success)."""
    if not partial:
        return before
    if not isinstance(before, dict) or not before:
        return partial
    merged = dict(before)
    for key, frame in partial.items():
        if key in before and isinstance(before[key], pd.DataFrame):
            previous = before[key]
            frame = frame.copy()
            frame.index = pd.RangeIndex(len(previous), len(previous) + len(frame))
            merged[key] = pd.concat([previous, frame])
            merged[key].index.name = previous.index.name
        else:
            merged[key] = frame
    return merged


@contextlib.contextmanager
def restore_on_failure(model, trainer_kwargs: dict) -> Iterator[None]:
    """Run a ``train()`` call; on an exception restore the module and keep the history.

    ``trainer_kwargs`` (the ``train`` keyword arguments) gets a callback that captures the
    history logged before the failure.
    """
    module = model.module
    snapshot = copy.deepcopy(module.state_dict())
    was_training = module.training
    sampler = getattr(module, "sampler", None)
    sampler_counters = {
        name: getattr(sampler, name) for name in ("fallbacks",) if hasattr(sampler, name)
    }
    # Generators and seed streams live outside the state_dict (wrappers include children's).
    random_state = None if sampler is None else sampler.random_state()
    partial: dict = {}
    callbacks = trainer_kwargs.get("callbacks")
    callbacks = [] if callbacks is None else list(callbacks)
    trainer_kwargs["callbacks"] = [*callbacks, _HistoryOnFailure(partial)]
    before = model.history_
    try:
        yield
    except Exception as err:
        module.load_state_dict(snapshot)
        module.train(was_training)
        for name, value in sampler_counters.items():
            setattr(sampler, name, value)
        if random_state is not None:
            sampler.set_random_state(random_state)
        model.history_ = _merged_history(before, partial)
        epochs = max((len(v) for v in partial.values()), default=0)
        note = (
            "The model's weights, persistent chains, log Z and sampler random state were "
            "restored to their state before this train() call; model.history keeps the "
            f"{epochs} epoch(s) logged before the failure. Fix the cause and call train() "
            "again to start from the restored state."
        )
        logger.warning("train() failed (%s: %s). %s", type(err).__name__, err, note)
        from scqbm.samplers import SamplerError

        if type(err) is SamplerError:  # the note in the message itself, where users look
            raise SamplerError(f"{err} {note}") from err
        err.add_note(note)
        raise
