"""QBMTrainingPlan: scvi's TrainingPlan plus the negative phase of the Boltzmann prior."""

from __future__ import annotations

import logging
import math
import time

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
#: Default largest share of training wall time spent on routine AIS refreshes of log Z. At
#: n_latent=256 the drift rule asks for an AIS run on most steps (about 20 per epoch on the
#: simulation) and training ran at about a tenth of the default width's cells/s.
LOG_Z_REFRESH_BUDGET = 0.1


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

    Routine AIS refreshes during training are capped at ``log_z_refresh_budget`` of the
    training wall time: a refresh that is due beyond it is deferred (the step's logged loss
    then uses the older estimate; the history's ``log_z_deferred`` and
    ``log_z_deferred_drift`` count the deferrals and give the largest drift estimate a logged
    value carried). The first estimate, the one before each validation pass and the final
    one always run, and an exact log Z is never deferred. AIS draws from a generator of its
    own, seeded per refresh from the fit's seed and the step, so that when log Z is refreshed
    never changes the random numbers training uses: with the same seed, the trained weights
    are the same whatever the budget (and the machine's speed).

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
    log_z_refresh_budget
        Largest share of the training wall time spent on routine AIS refreshes of log Z
        (default ``LOG_Z_REFRESH_BUDGET``, 0.1); ``None``: every due refresh runs, so that
        every logged training loss uses a log Z within the tolerance. It binds at wide latents
        (hundreds of units), where log Z moves by the tolerance almost every step.
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
        log_z_refresh_budget: float | None = LOG_Z_REFRESH_BUDGET,
        **kwargs,
    ):
        super().__init__(module, **kwargs)
        if int(log_z_max_updates) < 0:
            raise ValueError(f"`log_z_max_updates` must be >= 0, got {log_z_max_updates}.")
        if log_z_refresh_budget is not None and not 0 < log_z_refresh_budget <= 1:
            raise ValueError(
                "`log_z_refresh_budget` must be a share of the training time in (0, 1], or "
                f"None for no limit; got {log_z_refresh_budget}."
            )
        self.log_z_refresh_budget = log_z_refresh_budget
        self.log_z_max_updates = int(log_z_max_updates)
        self.lr_prior = lr_prior
        self.weight_decay_prior = weight_decay_prior
        if log_partition_every_n_steps is None:
            log_partition_every_n_steps = 10 if module.exact_log_partition else 0
        self.log_partition_every_n_steps = log_partition_every_n_steps
        self._log_z_step = -1  # global step at which log Z was last computed
        self._log_z_seed = 0  # read at fit start; AIS refreshes derive their seeds from it
        self._log_z_seconds = 0.0  # wall time of routine AIS refreshes in this fit
        self._train_start = time.perf_counter()
        self._last_negative_samples: torch.Tensor | None = None
        self._max_saturation: torch.Tensor | None = None
        self._warned: set[str] = set()
        self._reset_log_z_stats()
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
        # A generator of its own, seeded by the step: AIS never draws from the random numbers
        # of training, whenever it runs. Pooled over the ranks under DDP.
        seed = self._log_z_seed + 2 * self.global_step + int(final)
        generator = torch.Generator(device=prior.h.device).manual_seed(seed)
        refresh_log_z(prior, size=self._world()[1], final=final, generator=generator)
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

    def _over_budget(self, drift: float) -> bool:
        """Whether a due AIS refresh is deferred: beyond the time budget on every rank."""
        prior = self.module.prior
        if self.log_z_refresh_budget is None or prior.exact or math.isinf(drift):
            return False
        elapsed = time.perf_counter() - self._train_start
        over = self._log_z_seconds > self.log_z_refresh_budget * elapsed
        # Deferred only if every rank is over (the ranks must agree; any_rank is an OR).
        return not any_rank(not over, prior.log_z.device, self._world()[1])

    def _keep_log_z_current(
        self, negative_samples: torch.Tensor | None = None, budgeted: bool = True
    ) -> None:
        """The one refresh schedule: drift beyond tolerance, or the fixed period."""
        prior = self.module.prior
        every = self.log_partition_every_n_steps
        periodic = bool(every) and self.global_step % every == 0
        drift = prior.log_z_drift(negative_samples)
        due = periodic or drift > prior.log_z_tolerance
        size = self._world()[1]
        # Under DDP all ranks refresh together.
        if not any_rank(due, prior.log_z.device, size):
            return
        if not periodic and self._update_log_z(negative_samples):
            return
        if budgeted and self._over_budget(drift):
            self._log_z_deferred += 1
            self._log_z_deferred_drift = max(drift, self._log_z_deferred_drift or 0.0)
            return
        start = time.perf_counter()
        self._refresh_log_z()
        if budgeted and not math.isinf(drift):  # the first estimate is not a routine one
            self._log_z_seconds += time.perf_counter() - start

    def setup(self, stage: str | None = None) -> None:
        # Before DDP wraps the plan: each rank keeps its own chains, not rank 0's.
        if self._world()[1] > 1:
            keep_chains_local(self)

    def on_fit_start(self) -> None:
        decorrelate_ranks(self.module.sampler, self._world()[0])
        # The global generator's seed (set by scvi.settings.seed, offset per rank under DDP),
        # read without drawing from it: training's random numbers stay as they were.
        self._log_z_seed = torch.initial_seed() % (1 << 62)

    def on_train_start(self) -> None:
        self._warned = set()
        self._reset_log_z_stats()
        self._log_z_seconds = 0.0
        self._train_start = time.perf_counter()
        properties = self.module.sampler.properties
        if self.module.prior.needs_negative_phase and not properties["persistent"]:
            self._warn_once(
                "fresh",
                f"Sampler {self.module.sampler_name!r} keeps no chains between training steps "
                "(properties['persistent'] is False): every negative phase starts afresh.",
            )

    def on_validation_epoch_start(self) -> None:
        # The last training step's samples: drawing new ones would move the chains. Never
        # deferred: the validation ELBO (early stopping's monitor) uses this estimate.
        self._keep_log_z_current(self._last_negative_samples, budgeted=False)

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

    def _reset_log_z_stats(self) -> None:
        """The per-epoch log Z counters of the history (refreshes, updates, deferrals)."""
        self._log_z_refreshes = 0
        self._log_z_updates = 0
        self._log_z_update_error: float | None = None
        self._log_z_deferred = 0
        self._log_z_deferred_drift: float | None = None

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
        self.log("log_z_deferred", float(self._log_z_deferred), **log)
        if self._log_z_deferred_drift is not None:
            self.log("log_z_deferred_drift", self._log_z_deferred_drift, **log)
        self._reset_log_z_stats()
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
