"""Boltzmann-machine priors over binary latents: p(z) = exp(-E(z)) / Z, E(z) = -h.z - z'Wz.

:class:`BoltzmannPrior` is the one owner of the Boltzmann side of the model: its parameters,
the stored estimate of log Z (value and standard error, as buffers) with the estimator
settings, the KL term of the ELBO, and fresh samples. The module calls it; the training plan
only decides when to :meth:`~scqbm.prior.BoltzmannPrior.refresh`.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from scqbm.nn._relaxations import bernoulli_entropy

from ._energy import bipartite_energy, boltzmann_energy
from ._gibbs_kernels import gibbs_sweep
from ._log_partition import (
    AIS_FINAL_N_BETAS,
    AIS_FINAL_N_CHAINS,
    AIS_N_BETAS,
    AIS_N_CHAINS,
    MAX_EXACT_UNITS,
    LatentTooLargeError,
    LogPartitionEstimate,
    ais_log_partition,
    exact_log_partition,
    log_mean_weight,
    n_enumerated_units,
)

PriorStructure = Literal["bm", "rbm", "factorial"]
LogPartitionMethod = Literal["auto", "exact", "ais"]
PRIOR_STRUCTURES = ("bm", "rbm", "factorial")

#: Default tolerance (nats) of the stored log Z against the current prior: the drift bound
#: plus AIS error stays within 1 nat per cell of a fresh estimate.
LOG_Z_TOLERANCE = 0.5
#: Smallest effective sample size, as a fraction of the samples, at which an importance-sampling
#: update of log Z (:meth:`BoltzmannPrior.log_z_ratio`) is trusted; below it a fresh AIS runs.
LOG_Z_MIN_ESS = 0.5


class BoltzmannPrior(nn.Module):
    """Boltzmann machine over ``n_units`` binary units, with its log Z estimate and KL.

    Parameters
    ----------
    n_units
        Number of binary latent units.
    structure
        ``"bm"``: fully connected, ``W`` symmetric with zero diagonal (the QBM-VAE paper).
        ``"rbm"``: bipartite; units ``[0, n_visible)`` couple only to ``[n_visible, n)``, which
        allows block Gibbs sampling and exact log Z by enumerating the smaller side.
        ``"factorial"``: no couplings at all (``W = 0``, fields only), the ablation that
        separates what the couplings do from what the binary bottleneck does; log Z is
        ``sum softplus(h)`` in closed form and samples are exact independent draws.
    n_visible
        Size of the first side of an RBM (default ``n_units // 2``). Ignored otherwise.
    init_scale
        Standard deviation of the initial couplings (fields start at zero).
    log_partition
        How the stored value of log Z is estimated: ``"exact"`` (enumeration), ``"ais"``
        (annealed importance sampling) or ``"auto"`` (exact when at most
        :data:`~scqbm.prior.MAX_EXACT_UNITS` units need enumerating).
    ais_kwargs
        ``n_chains`` and ``n_betas`` of routine AIS refreshes (defaults
        ``AIS_N_CHAINS``, ``AIS_N_BETAS``); ``final_n_chains`` and ``final_n_betas``
        of the final estimate at the end of training.
    log_z_tolerance
        Largest allowed distance (nats) between the stored log Z and that of the current
        parameters, as guaranteed by :meth:`~scqbm.prior.BoltzmannPrior.log_z_drift`; the
        training plan refreshes when the drift exceeds it.

    Notes
    -----
    ``W`` is stored through its free entries only (upper triangle for ``"bm"``, the
    ``n_visible x n_hidden`` block for ``"rbm"``), so symmetry and the zero diagonal hold by
    construction. ``z'Wz`` counts every pair twice: ``z'Wz = 2 sum_{i<j} W_ij z_i z_j``.

    """

    def __init__(
        self,
        n_units: int,
        structure: PriorStructure = "rbm",
        n_visible: int | None = None,
        init_scale: float = 0.01,
        log_partition: LogPartitionMethod = "auto",
        ais_kwargs: dict | None = None,
        log_z_tolerance: float = LOG_Z_TOLERANCE,
    ):
        super().__init__()
        if structure not in PRIOR_STRUCTURES:
            raise ValueError(
                f"`prior` must be one of {list(PRIOR_STRUCTURES)}, got {structure!r}."
            )
        if n_units < 2:
            raise ValueError(f"A Boltzmann prior needs at least 2 latent units, got {n_units}.")
        if log_partition not in ("auto", "exact", "ais"):
            raise ValueError(
                f"`log_partition` must be 'auto', 'exact' or 'ais', got {log_partition!r}."
            )
        if not log_z_tolerance > 0:
            raise ValueError(f"`log_z_tolerance` must be positive, got {log_z_tolerance}.")
        self.n_units = n_units
        self.structure = structure
        self.n_visible = None
        self.h = nn.Parameter(torch.zeros(n_units))
        if structure == "bm":
            rows, cols = torch.triu_indices(n_units, n_units, offset=1)
            self.register_buffer("_rows", rows, persistent=False)
            self.register_buffer("_cols", cols, persistent=False)
            self.couplings = nn.Parameter(init_scale * torch.randn(rows.numel()))
        elif structure == "rbm":
            self.n_visible = n_units // 2 if n_visible is None else int(n_visible)
            if not 0 < self.n_visible < n_units:
                raise ValueError(
                    f"`n_visible` must be between 1 and n_latent - 1 = {n_units - 1}, "
                    f"got {self.n_visible}."
                )
            n_hidden = n_units - self.n_visible
            self.couplings = nn.Parameter(init_scale * torch.randn(self.n_visible, n_hidden))
        else:
            # No parameter at all: an optimizer cannot move couplings that do not exist.
            self.couplings = None
        self.log_partition_method = log_partition
        ais = dict(ais_kwargs or {})
        unknown = set(ais) - {"n_chains", "n_betas", "final_n_chains", "final_n_betas"}
        if unknown:
            raise TypeError(
                f"Unknown `ais_kwargs` {sorted(unknown)}; accepted: n_chains, n_betas, "
                "final_n_chains, final_n_betas."
            )
        self.ais_kwargs = {
            "n_chains": int(ais.get("n_chains", AIS_N_CHAINS)),
            "n_betas": int(ais.get("n_betas", AIS_N_BETAS)),
        }
        self.final_ais_kwargs = {
            "n_chains": int(ais.get("final_n_chains", AIS_FINAL_N_CHAINS)),
            "n_betas": int(ais.get("final_n_betas", AIS_FINAL_N_BETAS)),
        }
        if log_partition == "exact" and not self.can_enumerate():
            raise LatentTooLargeError(
                f"`log_partition='exact'` is not feasible for n_latent={n_units} with "
                f"prior={structure!r}: use log_partition='auto' or 'ais', prior='rbm' (which "
                f"enumerates only its smaller side, up to n_latent={2 * MAX_EXACT_UNITS}), or "
                f"n_latent <= {MAX_EXACT_UNITS}."
            )
        self.log_z_tolerance = float(log_z_tolerance)
        # Stored estimate of log Z (value only; gradients come from negative samples).
        self.register_buffer("log_z", torch.tensor(float("nan")))
        self.register_buffer("log_z_stderr", torch.tensor(float("nan")))
        # Parameters at the last estimate, for the drift bound; not saved (a loaded model
        # re-estimates before it trains on, queries use the stored value as saved).
        self.register_buffer("_ref_h", torch.zeros(n_units), persistent=False)
        n_free = 0 if self.couplings is None else self.couplings.numel()
        self.register_buffer("_ref_couplings", torch.zeros(n_free), persistent=False)
        self._has_reference = False
        # Importance-sampling updates applied since the last fresh estimate.
        self.log_z_updates = 0

    # ------------------------------------------------------------- parameters
    def coupling_matrix(self, couplings: torch.Tensor | None = None) -> torch.Tensor:
        """Dense symmetric zero-diagonal ``W`` of shape ``(n, n)`` (differentiable).

        ``couplings``: other free entries of the same shape (default: the parameters).
        """
        couplings = self.couplings if couplings is None else couplings
        n = self.n_units
        W = torch.zeros(n, n, device=self.h.device, dtype=self.h.dtype)
        if self.structure == "factorial":
            return W
        if self.structure == "bm":
            upper = W.index_put((self._rows, self._cols), couplings)
            return upper + upper.T
        nv = self.n_visible
        W = W.index_put(
            (
                torch.arange(nv, device=W.device).unsqueeze(-1),
                torch.arange(nv, n, device=W.device),
            ),
            couplings,
        )
        return W + W.T

    def coupling_block(self) -> torch.Tensor | None:
        """An RBM's couplings as their ``(n_visible, n_hidden)`` block (``None`` otherwise).

        ``W`` is this block, its transpose and zeros: products with it do a quarter of the
        dense work, which at hundreds of units is most of the prior's cost per step.
        """
        return self.couplings if self.structure == "rbm" else None

    def energy(self, z: torch.Tensor, W: torch.Tensor | None = None) -> torch.Tensor:
        """Energy ``E(z) = -h.z - z'Wz`` of binary states ``z`` of shape ``(..., n)``.

        Without ``W``, an RBM uses its coupling block and the factorial prior its fields
        alone (same value, no dense matrix).
        """
        if W is None and self.structure == "rbm":
            return bipartite_energy(z, self.h, self.couplings)
        if W is None and self.structure == "factorial":
            return -(z @ self.h)
        W = self.coupling_matrix() if W is None else W
        return boltzmann_energy(z, self.h, W)

    def expected_energy(self, probs: torch.Tensor, W: torch.Tensor | None = None) -> torch.Tensor:
        """``E_q[E(z)]`` under the factorial Bernoulli ``q`` with the given probabilities.

        Exact, because ``E[z_i z_j] = q_i q_j`` for ``i != j`` and ``W`` has a zero diagonal; it
        is therefore the energy formula evaluated at ``q``.
        """
        return self.energy(probs, W)

    # ------------------------------------------------------------------ log Z
    def can_enumerate(self) -> bool:
        """Whether exact log Z is within :data:`MAX_EXACT_UNITS` enumerated units."""
        if self.structure == "factorial":
            return True
        return n_enumerated_units(self.n_units, self.n_visible) <= MAX_EXACT_UNITS

    @property
    def exact(self) -> bool:
        """Whether the stored log Z is computed exactly (enumeration or closed form)."""
        return self.log_partition_method == "exact" or (
            self.log_partition_method == "auto" and self.can_enumerate()
        )

    @property
    def needs_negative_phase(self) -> bool:
        """Whether the gradient of log Z needs negative-phase samples (not for ``factorial``)."""
        return self.structure != "factorial"

    def log_partition_exact(self) -> torch.Tensor:
        """Exact log Z (differentiable); raises ``LatentTooLargeError`` beyond the limit."""
        if self.structure == "factorial":
            return F.softplus(self.h).sum()
        return exact_log_partition(self.h, self.coupling_matrix(), self.n_visible)

    @torch.no_grad()
    def log_partition(
        self,
        method: LogPartitionMethod = "auto",
        **ais_kwargs,
    ) -> LogPartitionEstimate:
        """A fresh estimate of log Z (nothing is stored).

        Exact for ``"exact"`` (or ``"auto"`` when small enough), else AIS with the prior's
        settings updated by ``ais_kwargs`` (``n_chains``, ``n_betas``, ``generator``).
        """
        if method not in ("auto", "exact", "ais"):
            raise ValueError(f"`method` must be 'auto', 'exact' or 'ais', got {method!r}.")
        # Outside inference mode even for queries: the enumerated states are cached and must
        # stay usable by later differentiable computations. Leaving inference mode turns grad
        # mode back on: no_grad again, so that no graph is built for a value.
        with torch.inference_mode(False), torch.no_grad():
            if method == "exact" or (method == "auto" and self.can_enumerate()):
                return LogPartitionEstimate(float(self.log_partition_exact()), 0.0, "exact")
            return ais_log_partition(
                self.h,
                self.coupling_matrix(),
                self.n_visible,
                **{**self.ais_kwargs, **ais_kwargs},
            )

    def estimate(self, final: bool = False, **ais_kwargs) -> LogPartitionEstimate:
        """A fresh estimate with the prior's own method (``final``: the precise AIS settings)."""
        base = self.final_ais_kwargs if final else self.ais_kwargs
        method = "exact" if self.exact else "ais"
        return self.log_partition(method, **{**base, **ais_kwargs})

    def refresh(self, final: bool = False, **ais_kwargs) -> LogPartitionEstimate:
        """Re-estimate log Z and store it (value, standard error, reference parameters).

        Safe to call from query methods under ``torch.inference_mode()``: the buffers are
        updated in place with inference mode switched off here, so they stay usable by later
        backward passes.
        """
        estimate = self.estimate(final=final, **ais_kwargs)
        with torch.inference_mode(False), torch.no_grad():
            self.log_z.fill_(estimate.value)
            self.log_z_stderr.fill_(estimate.stderr)
        self._set_reference()
        self.log_z_updates = 0
        return estimate

    def _set_reference(self) -> None:
        """Make the current parameters the ones the stored log Z refers to."""
        with torch.inference_mode(False), torch.no_grad():
            self._ref_h.copy_(self.h.detach())
            if self.couplings is not None:
                self._ref_couplings.copy_(self.couplings.detach().reshape(-1))
        self._has_reference = True

    def current_log_z(self) -> torch.Tensor:
        """The stored log Z (a 0-d buffer), estimated on first use."""
        if torch.isnan(self.log_z):
            self.refresh()
        return self.log_z

    def stored_estimate(self) -> LogPartitionEstimate:
        """The stored log Z as a :class:`~scqbm.prior.LogPartitionEstimate`."""
        self.current_log_z()
        kind = "exact" if self.exact else "ais"
        return LogPartitionEstimate(float(self.log_z), float(self.log_z_stderr), kind)

    @torch.no_grad()
    def log_z_drift(self, samples: torch.Tensor | None = None) -> float:
        """How far log Z may have moved since the last estimate (nats).

        The bound: ``log Z(now) - log Z(ref) = log E_ref[exp(-dE(z))]`` lies between the
        smallest and the largest of ``-dE`` over states. For binary states ``-dE(z) = dh.z +
        sum_{i<j} 2 dW_ij z_i z_j`` (each free coupling stands for the pair ``W_ij = W_ji``)
        is at most the sum ``P`` of the positive coefficients and at least minus the sum
        ``N`` of the negative ones' magnitudes, so ``|d log Z| <= max(P, N)``: a rigorous
        bound, about half the ``P + N`` of the plain absolute sum when the parameters move
        both ways (as Adam's steps do), so about half as many drift-triggered refreshes of an
        exact log Z. It holds for every state and is what an exact log Z is refreshed by.

        With ``samples`` of the current prior (the negative phase) and an AIS log Z, a loose
        bound (large priors move by more than the tolerance every step in the bound's worst
        case) is replaced by the importance-sampling estimate of the actual change,
        ``|log Z(now) - log Z(ref)| = |log E_now[exp(E_now(z) - E_ref(z))]|``, which is cheap
        and consistent, but an estimate.

        ``inf`` before the first estimate (or after loading a model, whose reference
        parameters are not saved).
        """
        if not self._has_reference or torch.isnan(self.log_z):
            return math.inf
        coefficients = self.h - self._ref_h
        if self.couplings is not None:
            pairs = 2.0 * (self.couplings.reshape(-1) - self._ref_couplings)
            coefficients = torch.cat([coefficients, pairs])
        up = coefficients.clamp(min=0.0).sum()
        down = coefficients.clamp(max=0.0).sum().neg()
        bound = float(torch.maximum(up, down))
        if bound <= self.log_z_tolerance or self.exact or samples is None:
            return bound
        change, _ = log_mean_weight(self._log_weights_since_reference(samples))
        return min(bound, abs(float(change)))

    def _log_weights_since_reference(self, samples: torch.Tensor) -> torch.Tensor:
        """``E_now(z) - E_ref(z)`` per sample: log importance weights of ``Z_ref / Z_now``."""
        z = samples.detach().to(self.h.dtype)
        # E is linear in (h, W): one energy under the parameter change, not two energies.
        dh = self.h - self._ref_h
        if self.structure == "rbm":
            dB = self.couplings - self._ref_couplings.reshape(self.couplings.shape)
            return bipartite_energy(z, dh, dB)
        return boltzmann_energy(z, dh, self.coupling_matrix() - self._reference_matrix())

    @torch.no_grad()
    def log_z_ratio(self, samples: torch.Tensor) -> LogPartitionEstimate | None:
        """Importance-sampling estimate of ``log Z(ref) - log Z(now)`` from current samples.

        ``Z_ref / Z_now = E_now[exp(E_now(z) - E_ref(z))]``: with samples of the current prior
        (the step's negative phase) this moves the stored log Z to the current parameters at
        the cost of one energy evaluation instead of an AIS run. ``stderr`` is the
        delta-method standard error. The estimate is consistent only if the samples follow the
        current prior; the training plan therefore bounds the number of updates between fresh
        AIS estimates and reports how far the updated value was from the next fresh one.

        Returns
        -------
        ``None`` where it does not apply or is not trusted: an exact log Z, no stored
        estimate, or an effective sample size below ``scqbm.prior.LOG_Z_MIN_ESS`` of the samples.
        A :class:`LogPartitionEstimate` in the form of an AIS result (``value`` the log mean
        importance weight), so that ranks' estimates pool like AIS estimates.

        """
        if self.exact or not self._has_reference or torch.isnan(self.log_z):
            return None
        log_w = self._log_weights_since_reference(samples)
        k = log_w.shape[0]
        w = torch.exp(log_w - log_w.max())
        ess = float(w.sum() ** 2 / (w**2).sum())
        if k < 2 or ess < LOG_Z_MIN_ESS * k:
            return None
        value, stderr = log_mean_weight(log_w)
        return LogPartitionEstimate(float(value), float(stderr), "ais")

    def apply_log_z_ratio(self, ratio: LogPartitionEstimate) -> None:
        """Move the stored log Z to the current parameters by a ``log_z_ratio`` estimate.

        The standard errors add in quadrature; the current parameters become the reference.
        """
        with torch.inference_mode(False), torch.no_grad():
            self.log_z.sub_(ratio.value)
            self.log_z_stderr.fill_(math.hypot(float(self.log_z_stderr), ratio.stderr))
        self._set_reference()
        self.log_z_updates += 1

    def _reference_matrix(self) -> torch.Tensor:
        """``W`` at the last estimate."""
        if self.couplings is None:
            return self.coupling_matrix()
        return self.coupling_matrix(self._ref_couplings.reshape(self.couplings.shape))

    def needs_refresh(self) -> bool:
        """Whether :meth:`~scqbm.prior.BoltzmannPrior.log_z_drift` exceeds ``log_z_tolerance``."""
        return self.log_z_drift() > self.log_z_tolerance

    # --------------------------------------------------------------------- KL
    def kl(
        self,
        logits: torch.Tensor,
        negative_samples: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Per-cell ``KL(q || p) = -H(q) + E_q[E(z)] + log Z`` for factorial Bernoulli ``q``.

        Parameters
        ----------
        logits
            Logits of ``q``, shape ``(..., n)``.
        negative_samples
            Binary samples of the prior ``(S, n)`` (no gradient). The log Z term then carries
            the gradient ``-mean_s dE(z_s)/dtheta`` (positive minus negative phase) while its
            value stays the stored estimate. For ``"factorial"`` log Z is exact and
            differentiable in closed form and the samples are not needed.

        """
        # Only the dense prior builds its W here: an RBM's products go through the block B,
        # the factorial prior has no couplings.
        B = self.coupling_block()
        W = self.coupling_matrix() if self.structure == "bm" else None
        probs = torch.sigmoid(logits)
        if self.structure == "factorial":
            log_z = self.log_partition_exact()
        else:
            log_z = self.current_log_z()
            if negative_samples is not None:
                # The samples' mean energy from their first and second moments: the same value
                # and gradient as averaging per-sample energies, without a backward matmul.
                z = negative_samples.detach().to(self.h.dtype)
                if B is not None:  # only the visible-hidden block of the moments is needed
                    nv = self.n_visible
                    cross_moment = z[:, :nv].T @ z[:, nv:] / z.shape[0]
                    pairwise = 2.0 * (B * cross_moment).sum()
                else:
                    pairwise = (W * (z.T @ z / z.shape[0])).sum()
                surrogate = z.mean(0) @ self.h + pairwise  # = -mean E(z_s)
                log_z = log_z + (surrogate - surrogate.detach())
        return -bernoulli_entropy(logits) + self.expected_energy(probs, W) + log_z

    # ---------------------------------------------------------------- samples
    def sample(
        self, n_samples: int, burn_in: int = 1_000, seed: int | None = None
    ) -> torch.Tensor:
        """Binary samples ``(n_samples, n)`` of the prior from fresh chains.

        Gibbs chains (block updates for an RBM, systematic scans for a dense machine) run for
        ``burn_in`` sweeps plus one, independent of any training chains; the ``"factorial"``
        prior is sampled exactly. ``seed`` seeds a private generator (the global torch RNG is
        used when ``None``).
        """
        if n_samples < 1:
            raise ValueError(f"`n_samples` must be a positive integer, got {n_samples}.")
        if burn_in < 0:
            raise ValueError(f"`burn_in` must be >= 0, got {burn_in}.")
        device, dtype = self.h.device, self.h.dtype
        generator = None if seed is None else torch.Generator(device=device).manual_seed(seed)
        with torch.inference_mode(False), torch.no_grad():
            h, W = self.h.detach(), self.coupling_matrix().detach()
            shape = (n_samples, self.n_units)
            if self.structure == "factorial":
                u = torch.rand(shape, generator=generator, device=device, dtype=dtype)
                return (u < torch.sigmoid(h)).to(dtype)
            z = torch.rand(shape, generator=generator, device=device, dtype=dtype).round()
            for _ in range(burn_in + 1):
                z = gibbs_sweep(z, h, W, self.n_visible, generator=generator)
            return z

    def extra_repr(self) -> str:
        split = f", n_visible={self.n_visible}" if self.n_visible is not None else ""
        return (
            f"n_units={self.n_units}, structure={self.structure!r}{split}, "
            f"log_partition={self.log_partition_method!r}"
        )
