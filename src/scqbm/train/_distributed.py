"""Training under Lightning's DDP: chains per rank, one pooled log Z, reduced diagnostics.

The semantics (see the model guide, "Several processes"):

* Every rank keeps its own persistent chains. DDP broadcasts module buffers from rank 0
  before each forward pass; the sampler's buffers are excluded from that broadcast
  (:func:`keep_chains_local`), and ranks other than 0 draw from their own random streams
  (:func:`decorrelate_ranks`), so the chains differ across ranks.
* The prior's gradient uses the negative samples of all ranks with equal weight: each rank's
  surrogate gradient comes from its own chains and DDP's all-reduce averages the gradients,
  which is the gradient of the mean over all ranks' samples (every rank has as many chains).
* Log Z is estimated once per refresh, jointly: every rank runs ``1 / world_size`` of the AIS
  chains and the estimates are pooled (:func:`pooled_estimate`), so all ranks use the same
  value and a refresh takes ``1 / world_size`` of the time. An exact log Z is the same
  deterministic number on every rank (the parameters are synchronised) and is not exchanged.
  Whether to refresh is agreed on by all ranks (:func:`any_rank`).
* A model trained this way saves and loads like any other: rank 0's module (with rank 0's
  chains) is the one saved.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from scqbm.prior import LogPartitionEstimate


def world(trainer=None) -> tuple[int, int]:
    """``(rank, world_size)`` of the fit that ``trainer`` runs; ``(0, 1)`` outside DDP.

    The trainer decides, not the global process group: Lightning leaves the group initialised
    after a DDP fit, and a later single-process fit in the same process (rank 0 evaluating and
    training on, a notebook) must not wait in collectives for ranks that have exited.
    """
    size = getattr(trainer, "world_size", 1)  # 1 without a trainer
    if size > 1 and dist.is_available() and dist.is_initialized():
        return int(trainer.global_rank), size
    return 0, 1


def keep_chains_local(plan) -> None:
    """Exclude the sampler's buffers (persistent chains) from DDP's buffer broadcast.

    Must run before the strategy wraps the plan in ``DistributedDataParallel`` (the plan's
    ``setup`` hook); DDP reads the names from ``_ddp_params_and_buffers_to_ignore``.
    """
    names = [f"module.sampler.{name}" for name, _ in plan.module.sampler.named_buffers()]
    ignored = set(getattr(plan, "_ddp_params_and_buffers_to_ignore", ())) | set(names)
    plan._ddp_params_and_buffers_to_ignore = sorted(ignored)


def decorrelate_ranks(sampler, rank: int) -> None:
    """Give rank ``rank > 0`` its own random streams (all ranks are seeded alike).

    The global torch generator (chain initialisation and sweeps of unseeded samplers, AIS,
    dropout) is re-seeded with ``initial_seed + rank``; a seeded sampler's own generator gets
    ``seed + rank``. Rank 0 keeps its streams, so it reproduces a single-process run's
    random numbers at the start.
    """
    if rank == 0:
        return
    torch.manual_seed(torch.initial_seed() + rank)
    for module in sampler.modules():
        if getattr(module, "seed", None) is not None:
            module.seed = int(module.seed) + rank
            if hasattr(module, "_generator"):
                module._generator = None


def any_rank(flag: bool, device: torch.device, size: int) -> bool:
    """Whether ``flag`` holds on any of ``size`` ranks (a collective: every rank must call it)."""
    if size == 1:
        return bool(flag)
    value = torch.tensor(float(flag), device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value > 0)


def pooled_estimate(
    estimate: LogPartitionEstimate, device: torch.device, size: int
) -> LogPartitionEstimate:
    """Pool the ranks' AIS estimates of log Z (each from the same number of chains).

    With ``m_r`` the mean importance weight of rank ``r`` (``log m_r = value_r - log Z_0``,
    the same ``log Z_0`` everywhere), the pooled mean is ``mean_r m_r``, so the pooled value
    is ``logsumexp_r(value_r) - log R``; its delta-method standard error is
    ``sqrt(sum_r (m_r se_r)^2) / sum_r m_r``, the ranks' runs being independent.
    """
    if size == 1 or estimate.method != "ais":
        return estimate
    mine = torch.tensor([estimate.value, estimate.stderr], device=device, dtype=torch.float64)
    gathered = [torch.empty_like(mine) for _ in range(size)]
    dist.all_gather(gathered, mine)
    values = torch.stack([g[0] for g in gathered])
    stderrs = torch.stack([g[1] for g in gathered])
    value = torch.logsumexp(values, 0) - math.log(size)
    weights = torch.exp(values - values.max())
    stderr = torch.sqrt(((weights * stderrs) ** 2).sum()) / weights.sum()
    return LogPartitionEstimate(float(value), float(stderr), "ais")


def chains_per_rank(n_chains: int, size: int) -> int:
    """AIS chains each of ``size`` ranks runs so that together they run about ``n_chains``."""
    return max(1, math.ceil(n_chains / size))


def refresh_log_z(
    prior, size: int = 1, final: bool = False, generator: torch.Generator | None = None
) -> LogPartitionEstimate:
    """``prior.refresh(final)``, with AIS split over ``size`` ranks and pooled under DDP.

    Every rank must call it (a collective when distributed and log Z is not exact).
    ``generator``: the random generator of the AIS chains (default torch's global one).
    """
    if size == 1 or prior.exact:
        return prior.refresh(final=final, generator=generator)
    settings = prior.final_ais_kwargs if final else prior.ais_kwargs
    n_chains = chains_per_rank(settings["n_chains"], size)
    estimate = prior.refresh(final=final, n_chains=n_chains, generator=generator)
    pooled = pooled_estimate(estimate, prior.log_z.device, size)
    with torch.inference_mode(False), torch.no_grad():
        prior.log_z.fill_(pooled.value)
        prior.log_z_stderr.fill_(pooled.stderr)
    return pooled
