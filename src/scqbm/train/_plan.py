"""QBMTrainingPlan: scvi's TrainingPlan plus the negative phase of the Boltzmann prior."""

from __future__ import annotations

import logging
import math

import torch
from scvi.train import TrainingPlan

from scqbm.samplers import SamplerError

from ._distributed import (
    any_rank,
    decorrelate_ranks,
    keep_chains_local,
    pooled_estimate,
    refresh_log_z,
    world,
)

logger = logging.getLogger(__name__)

#: Fraction of saturated posterior probabilities on a batch above which training warns.
SATURATION_WARNING = 0.99
#: Default number of importance-sampling updates of log Z between fresh AIS estimates: off,
#: because at 400 epochs on the simulation an updated value was 4.3 nats from the next AIS
#: run (benchmarks/results/log_z_updates.log), beyond the tolerance.
LOG_Z_MAX_UPDATES = 0


class QBMTrainingPlan(TrainingPlan):
    """Training plan for :class:`~scqbm.module.QBMVAEModule`.

    On every training step, before the forward pass, it draws negative-phase samples of the
    prior outside autograd and hands them to the module's loss; it decides when the prior
    re-estimates log Z (the one schedule: see ``_keep_log_z_current``; never more than
    once per optimizer step); and it gives the prior its own learning rate and weight decay.

    Log Z is refreshed whenever the prior's drift since the last estimate
    (:meth:`~scqbm.prior.BoltzmannPrior.log_z_drift`) exceeds its ``log_z_tolerance``, so the
    logged ELBOs stay within that tolerance of a fresh estimate: for exact log Z by a bound
    that holds for every state, for AIS by the importance-sampling estimate of the change
    from the step's negative samples when the bound is loose. It is also refreshed before each
    validation pass if needed and, with the final (more precise) AIS settings, at the end.

    With ``log_z_max_updates > 0`` (opt-in), a refresh of an AIS log Z is, where it can be,
    not a new AIS run but an importance-sampling update from the same negative samples
    (:meth:`~scqbm.prior.BoltzmannPrior.log_z_ratio`): one energy evaluation instead of
    hundreds of Gibbs sweeps. At most ``log_z_max_updates`` updates follow one another, and
    only while their effective sample size is high and their accumulated standard error is
    within the tolerance; then a fresh AIS estimate runs, and its difference from the updated
    value is logged per epoch (``log_z_update_error``, the largest of the epoch), so that
    the updates' accuracy is measured on every fit. Gradients never depend on the stored
    value: it enters the logged ELBOs and query results only.

    Parameters
    ----------
    module
        A :class:`~scqbm.module.QBMVAEModule`.
    lr_prior
        Learning rate of the prior's fields and couplings (default: ``lr``).
    weight_decay_prior
        Weight decay (L2) of the prior's parameters; keeps couplings, hence sampling, tame.
    log_partition_every_n_steps
        Additional fixed refresh period of log Z in optimizer steps; ``None``: every 10 steps
        when log Z is exact (a few ms each for 2**16 states), else none beyond the drift rule.
    log_z_max_updates
        Most importance-sampling updates of an AIS log Z between two fresh AIS estimates;
        ``0`` (default): every refresh is a fresh AIS estimate. Opt-in and experimental: it
        makes training faster, but the updates can drift from AIS by more than the tolerance
        (``log_z_update_error`` in the history says by how much on each fit).
    **kwargs
        :class:`~scvi.train.TrainingPlan` arguments (``lr``, ``n_epochs_kl_warmup``, ...).

    """

    def __init__(
        self,
        module,
        *,
        lr_prior: float | None = None,
        weight_decay_prior: float = 1e-4,
        log_partition_every_n_steps: int | None = None,
        log_z_max_updates: int = LOG_Z_MAX_UPDATES,
        **kwargs,
    ):
        super().__init__(module, **kwargs)
        if int(log_z_max_updates) < 0:
            raise ValueError(f"`log_z_max_updates` must be >= 0, got {log_z_max_updates}.")
        self.log_z_max_updates = int(log_z_max_updates)
        self.lr_prior = lr_prior
        self.weight_decay_prior = weight_decay_prior
        if log_partition_every_n_steps is None:
            log_partition_every_n_steps = 10 if module.exact_log_partition else 0
        self.log_partition_every_n_steps = log_partition_every_n_steps
        self._log_z_step = -1  # global step at which log Z was last computed
        self._log_z_refreshes = 0
        self._log_z_updates = 0
        self._log_z_update_error: float | None = None
        self._last_negative_samples: torch.Tensor | None = None
        self._max_saturation: torch.Tensor | None = None
        self._warned: set[str] = set()
        self._reset_sampler_stats()

    def _world(self) -> tuple[int, int]:
        """``(rank, world_size)`` of the fit this plan is in (``(0, 1)`` without a trainer)."""
        return world(self._trainer)

    # ------------------------------------------------------------------ log Z
    def _refresh_log_z(self, final: bool = False) -> None:
        if self._log_z_step == self.global_step and not final:
            return
        prior = self.module.prior
        updated = float(prior.log_z) if prior.log_z_updates else None
        # Pooled over the ranks under DDP.
        refresh_log_z(prior, size=self._world()[1], final=final)
        if updated is not None:
            error = abs(updated - float(prior.log_z))
            self._log_z_update_error = max(error, self._log_z_update_error or 0.0)
        self._log_z_step = self.global_step
        self._log_z_refreshes += 1

    def _update_log_z(self, negative_samples: torch.Tensor | None) -> bool:
        """An importance-sampling update of log Z in place of a refresh, where trusted.

        A collective under DDP (every rank calls it when a refresh is due): the ranks agree on
        whether to update and pool their estimates, so all keep the same value.
        """
        prior = self.module.prior
        if prior.exact or prior.log_z_updates >= self.log_z_max_updates:
            return False
        ratio = None if negative_samples is None else prior.log_z_ratio(negative_samples)
        size = self._world()[1]
        if any_rank(ratio is None, prior.log_z.device, size):
            return False
        ratio = pooled_estimate(ratio, prior.log_z.device, size)
        if math.hypot(float(prior.log_z_stderr), ratio.stderr) > prior.log_z_tolerance:
            return False
        prior.apply_log_z_ratio(ratio)
        self._log_z_step = self.global_step
        self._log_z_updates += 1
        return True

    def _keep_log_z_current(self, negative_samples: torch.Tensor | None = None) -> None:
        """The one refresh schedule: drift beyond tolerance, or the fixed period."""
        prior = self.module.prior
        every = self.log_partition_every_n_steps
        periodic = bool(every) and self.global_step % every == 0
        due = periodic or prior.log_z_drift(negative_samples) > prior.log_z_tolerance
        # Under DDP all ranks refresh together.
        if not any_rank(due, prior.log_z.device, self._world()[1]):
            return
        if not periodic and self._update_log_z(negative_samples):
            return
        self._refresh_log_z()

    def setup(self, stage: str | None = None) -> None:
        # Before DDP wraps the plan: each rank keeps its own chains, not rank 0's.
        if self._world()[1] > 1:
            keep_chains_local(self)

    def on_fit_start(self) -> None:
        decorrelate_ranks(self.module.sampler, self._world()[0])

    def on_train_start(self) -> None:
        self._warned = set()
        self._log_z_refreshes = 0
        self._log_z_updates = 0
        self._log_z_update_error = None
        properties = self.module.sampler.properties
        if self.module.prior.needs_negative_phase and not properties["persistent"]:
            self._warn_once(
                "fresh",
                f"Sampler {self.module.sampler_name!r} keeps no chains between training steps "
                "(properties['persistent'] is False): every negative phase starts afresh.",
            )

    def on_validation_epoch_start(self) -> None:
        # The last training step's samples: drawing new ones would move the chains.
        self._keep_log_z_current(self._last_negative_samples)

    def on_train_end(self) -> None:
        # The final estimate is what query methods report: spend more on it.
        self._refresh_log_z(final=True)

    def _warn_once(self, key: str, message: str) -> None:
        warned = getattr(self, "_warned", set())
        if key not in warned:
            logger.warning(message)
            warned.add(key)
            self._warned = warned

    # ---------------------------------------------------------- training step
    def training_step(self, batch, batch_idx):
        """Draw negative samples, keep log Z current, then scvi's training step."""
        try:
            sample_set = self.module.sample_negative_phase()
        except Exception as err:  # re-raised with context, never swallowed
            raise SamplerError(
                f"Sampler {self.module.sampler_name!r} failed at training step "
                f"{self.global_step} (epoch {self.current_epoch}): {type(err).__name__}: {err}"
            ) from err
        samples = None if sample_set is None else sample_set.samples
        self._keep_log_z_current(samples)
        self._last_negative_samples = samples
        if sample_set is not None:
            self.loss_kwargs["negative_samples"] = samples
            self._log_sampler_info(sample_set.info)
            claimed = self.module.sampler.properties["persistent"]
            if claimed and sample_set.info.get("persistent") is False:
                self._warn_once(
                    "lost",
                    f"Sampler {self.module.sampler_name!r} declares persistent chains but ran "
                    f"fresh chains at step {self.global_step} (reads or units do not match its "
                    "chains).",
                )
        try:
            return super().training_step(batch, batch_idx)
        finally:
            # Validation and query-time losses must not see stale training samples.
            self.loss_kwargs.pop("negative_samples", None)
            # Kept on the device and read once per epoch: no host round trip per step.
            saturation = self.module.last_saturation
            if saturation is not None:
                self._max_saturation = (
                    saturation
                    if self._max_saturation is None
                    else torch.maximum(self._max_saturation, saturation)
                )

    def _warn_if_saturated(self) -> None:
        if self._max_saturation is None:
            return
        saturation = float(self._max_saturation)
        self._max_saturation = None
        if saturation > SATURATION_WARNING:
            self._warn_once(
                "saturation",
                f"The latent saturates: {100 * saturation:.1f}% of posterior probabilities "
                f"on a training batch of epoch {self.current_epoch} lie beyond 0.01/0.99; "
                "consider a smaller learning rate or a longer KL warm-up.",
            )

    def _reset_sampler_stats(self) -> None:
        self._sampler_seconds = 0.0
        self._sampler_fallbacks = 0
        self._sampler_betas: list[float] = []

    def _log_sampler_info(self, info: dict) -> None:
        # Accumulated in Python and logged once per epoch: a Lightning log call per step
        # costs more than the RBM's sampling itself.
        self._sampler_seconds += float(info["seconds"])
        # A backend that fell back to another sampler says so; it is counted, never hidden.
        self._sampler_fallbacks += int(info.get("fallback", 0))
        # Calibrated annealers report the effective inverse temperature they estimated.
        if info.get("effective_beta") is not None:
            self._sampler_betas.append(float(info["effective_beta"]))

    def on_train_epoch_end(self) -> None:
        """Log per-epoch diagnostics to the history.

        Sampler wall time, fallbacks and temperature, and the log Z estimate (with its standard
        error) that the epoch's ELBOs used.
        """
        self._warn_if_saturated()
        log = {"on_step": False, "on_epoch": True}
        # Under DDP: summed over ranks (no-ops in one process).
        summed = {**log, "sync_dist": True, "reduce_fx": "sum"}
        self.log("sampler_seconds", self._sampler_seconds, **summed)
        self.log("sampler_fallbacks", float(self._sampler_fallbacks), **summed)
        if self._sampler_betas:
            self.log(
                "sampler_effective_beta",
                sum(self._sampler_betas) / len(self._sampler_betas),
                **log,
                sync_dist=True,
            )
        self.log("log_z", float(self.module.prior.log_z), **log)
        self.log("log_z_stderr", float(self.module.prior.log_z_stderr), **log)
        self.log("log_z_refreshes", float(self._log_z_refreshes), **log)
        self.log("log_z_updates", float(self._log_z_updates), **log)
        if self._log_z_update_error is not None:
            self.log("log_z_update_error", self._log_z_update_error, **log)
        self._log_z_refreshes = 0
        self._log_z_updates = 0
        self._log_z_update_error = None
        self._reset_sampler_stats()

    # -------------------------------------------------------------- optimizer
    def get_optimizer_creator(self):
        """scvi's optimizer creator, handed two parameter groups: the prior gets its own.

        scvi-tools builds the optimizer (``optimizer="Adam"``, ``"AdamW"`` or a custom
        ``optimizer_creator``) from whatever its ``configure_optimizers`` passes; this wrapper
        only splits those (trainable) parameters into the network's group, with scvi's ``lr``
        and ``weight_decay``, and the prior's, with ``lr_prior`` and ``weight_decay_prior``.
        """
        create = super().get_optimizer_creator()
        prior_ids = {id(p) for p in self.module.prior.parameters()}

        def create_with_prior_group(params):
            params = list(params)
            network = [p for p in params if id(p) not in prior_ids]
            prior = [p for p in params if id(p) in prior_ids]
            groups = [{"params": network}] if network else []
            if prior:
                lr = self.lr if self.lr_prior is None else self.lr_prior
                groups.append({"params": prior, "lr": lr, "weight_decay": self.weight_decay_prior})
            return create(groups)

        return create_with_prior_group
