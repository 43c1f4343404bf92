"""Temperature calibration of annealing backends.

Physical and simulated annealers do not return samples of ``p(z) ∝ exp(-E(z))``: they return
low-energy states, frozen out at some effective inverse temperature ``beta_eff`` that depends
on the device (or schedule) and on the problem's scale. When the backend's samples are close
to ``exp(-beta_eff E(z))``, sending the problem divided by ``beta_eff`` makes them close to the
model's distribution (Benedetti et al. 2016, Phys. Rev. A 94, 022308; Amin 2015).

Estimators of ``beta_eff`` given samples ``z_1..z_N`` and the problem ``E``:

* ``"energy"``: the ``beta`` whose mean energy ``U(beta) = E_beta[E]`` equals the samples'
  mean energy. In the family ``exp(-beta E) / Z(beta)`` this is the maximum-likelihood
  estimate of ``beta`` (the score is ``U(beta) - mean E``), which Benedetti et al. obtain
  without ``Z`` from pairs of rescaled problems. ``U(beta)`` is computed exactly by
  enumeration when feasible, else by short Gibbs runs at ``beta`` started from the samples
  themselves (the ``beta`` at which the samples' energy does not drift).
* ``"pseudolikelihood"``: the maximiser of the pseudo-likelihood ``sum_s sum_i log
  p_beta(z_si | z_s,-i)``, which needs no reference chains and is cheap for large problems,
  but measures the *local* temperature of the samples (single-flip stability), which for
  frozen-out samples is colder than the global one.

Limitations: calibration corrects one global temperature. Samples whose distribution is not
of the form ``exp(-beta E)`` (freeze-out at different times for different modes, biased
hardware couplings, a schedule that scales with the problem) stay wrong after rescaling; the
tests compare calibrated backends with exact enumeration to find out.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Callable
from typing import Literal

import torch

from scqbm.prior import (
    MAX_EXACT_UNITS,
    boltzmann_energy,
    enumerate_states,
    gibbs_sweep,
    other_side_fields,
    split_bipartite,
)

from ._base import BoltzmannSampler

#: Largest number of enumerated units for the exact ``U(beta)``: the bisection evaluates it
#: about 30 times per calibration, so it stays 2**4 times below the one enumeration limit.
EXACT_ENERGY_UNITS = MAX_EXACT_UNITS - 4
#: Largest states x remaining units held at once for an RBM's exact ``U(beta)``.
_EXACT_ENTRIES = 1 << (EXACT_ENERGY_UNITS + 8)

CalibrationMethod = Literal["energy", "pseudolikelihood"]


def _bisect_log(
    score: Callable[[float], float], bounds: tuple[float, float], rel_tol: float
) -> float:
    """Root of a score decreasing in ``beta``, by bisection on ``log beta`` within ``bounds``.

    Returns a bound when the score does not change sign there (samples hotter than the lowest
    or colder than the highest ``beta`` allowed).
    """
    lo, hi = bounds
    if score(lo) <= 0.0:
        return lo
    if score(hi) >= 0.0:
        return hi
    while hi / lo > 1.0 + rel_tol:
        mid = math.sqrt(lo * hi)
        if score(mid) > 0.0:
            lo = mid
        else:
            hi = mid
    return math.sqrt(lo * hi)


def _exact_mean_energy(h: torch.Tensor, W: torch.Tensor, n_visible: int | None):
    """``beta -> U(beta)`` by enumeration, or ``None`` when the problem is too large.

    Enumerates all units of a dense machine, or the smaller side ``s`` of an RBM with the other
    side ``o`` summed out: ``log p(s) = -beta E_s(s) + sum_j softplus(beta a_j(s)) + const``
    and ``E[E | s] = E_s(s) - sum_j a_j(s) sigmoid(beta a_j(s))``, ``a(s) = h_o + 2 s B``.
    """
    h, W = h.double(), W.double()
    n = h.shape[0]
    if n_visible is None:
        if n > EXACT_ENERGY_UNITS:
            return None
        states = enumerate_states(n, h.device, h.dtype)
        own = boltzmann_energy(states, h, W)
        fields = states.new_zeros(states.shape[0], 0)
    else:
        side, other, B = split_bipartite(h, W, n_visible)
        k, m = B.shape
        if k > EXACT_ENERGY_UNITS or (2**k) * m > _EXACT_ENTRIES:
            return None
        states = enumerate_states(k, h.device, h.dtype)
        own = -(states @ h[side])
        fields = other_side_fields(states, h, B, other)

    def mean_energy(beta: float) -> float:
        log_weight = -beta * own + torch.nn.functional.softplus(beta * fields).sum(-1)
        conditional = own - (fields * torch.sigmoid(beta * fields)).sum(-1)
        return float(torch.softmax(log_weight, 0) @ conditional)

    return mean_energy


def estimate_effective_beta(
    samples: torch.Tensor,
    h: torch.Tensor,
    W: torch.Tensor,
    n_visible: int | None = None,
    *,
    method: CalibrationMethod = "energy",
    exact: bool | None = None,
    beta_bounds: tuple[float, float] = (1e-2, 1e2),
    rel_tol: float = 1e-3,
    reference_sweeps: int = 5,
    max_reference_chains: int = 256,
    seed: int = 0,
) -> float:
    """Effective inverse temperature ``beta_eff`` of binary samples of the problem ``(h, W)``.

    The samples are modelled as draws of ``exp(-beta_eff E(z))``, ``E(z) = -h.z - z'Wz``; see
    the module docstring for the estimators.

    Parameters
    ----------
    samples
        ``(N, n)`` 0/1 samples.
    h, W
        The problem the samples are judged against.
    n_visible
        Size of the first side of an RBM (enables exact enumeration of the smaller side).
    method
        ``"energy"`` (mean-energy matching, the maximum-likelihood estimate) or
        ``"pseudolikelihood"``.
    exact
        For ``"energy"``: ``None`` enumerates ``U(beta)`` when feasible (at most
        :data:`EXACT_ENERGY_UNITS` enumerated units) and uses reference runs otherwise;
        ``True`` requires enumeration, ``False`` always uses reference runs.
    beta_bounds
        Search interval; a bound is returned when the samples lie outside it.
    rel_tol
        Relative precision of the bisection.
    reference_sweeps
        Gibbs sweeps of the reference runs when ``U(beta)`` cannot be enumerated.
    max_reference_chains
        At most this many samples start reference chains.
    seed
        Seed of the reference runs; every ``beta`` is evaluated with the same random numbers
        so the score is a smooth, monotone function of ``beta``.

    """
    if method not in ("energy", "pseudolikelihood"):
        raise ValueError(f"`method` must be 'energy' or 'pseudolikelihood', got {method!r}.")
    samples, h, W = samples.double(), h.double(), W.double()
    if method == "pseudolikelihood":
        spins = 2.0 * samples - 1.0
        fields = h + 2.0 * (samples @ W)  # W has a zero diagonal: z_i is not its own field

        def score(beta: float) -> float:
            # Derivative of the mean log pseudo-likelihood; it decreases in beta (concavity).
            margin = spins * fields
            return float((margin * torch.sigmoid(-beta * margin)).sum(-1).mean())

        return _bisect_log(score, beta_bounds, rel_tol)

    observed = float(boltzmann_energy(samples, h, W).mean())
    mean_energy = None if exact is False else _exact_mean_energy(h, W, n_visible)
    if mean_energy is not None:
        return _bisect_log(lambda beta: mean_energy(beta) - observed, beta_bounds, rel_tol)
    if exact:
        raise ValueError(
            f"Exact mean energies need at most {EXACT_ENERGY_UNITS} enumerated units; this "
            "problem is larger (use exact=None or False)."
        )

    start = samples[:max_reference_chains]
    start_energy = float(boltzmann_energy(start, h, W).mean())

    def drift(beta: float) -> float:
        # Positive when Gibbs dynamics at beta heat the samples up: beta is too small.
        generator = torch.Generator(device=h.device).manual_seed(seed)
        z = start
        for _ in range(reference_sweeps):
            z = gibbs_sweep(
                z, h, W, n_visible, field_scale=beta, coupling_scale=beta, generator=generator
            )
        return float(boltzmann_energy(z, h, W).mean()) - start_energy

    return _bisect_log(drift, beta_bounds, rel_tol)


class CalibratedSampler(BoltzmannSampler):
    """Wrap a backend so that its samples approximate ``exp(-E(z))`` rather than ``exp(-beta E)``.

    On the first call and every ``calibrate_every`` calls the wrapper iterates: send
    ``(s h, s W)`` to the backend, estimate the inverse temperature ``b`` of the returned
    samples with respect to the model's ``(h, W)``, and set ``s <- s / b``, until ``|b - 1|``
    is below ``tol`` or two standard errors of ``b``, or ``max_iter`` draws. If the backend
    samples ``exp(-beta_B E')`` for any problem ``E'`` it is sent, then ``b = beta_B s`` and
    one step lands on ``s = 1 / beta_B``; the iteration absorbs a mild dependence of
    ``beta_B`` on the problem's scale. Between calibrations the stored scale is used as is.

    ``info["effective_beta"]`` is the backend's estimated inverse temperature ``beta_B = 1 /
    s`` (logged by the training plan as ``sampler_effective_beta``); calls that calibrate also
    report ``target_beta``, the estimated inverse temperature of the returned samples with
    respect to the model (1 is perfect), ``calibration_draws``, ``calibration_converged`` and
    ``calibration_informative``. A draw whose energies determine ``b`` to worse than
    :attr:`MAX_RELATIVE_SE` (a nearly flat prior, as at the start of training) leaves the
    scale unchanged.

    Like a dimod composite, the wrapper takes the child sampler *instance* and declares the
    child's ``num_reads`` and persistence as its own: a persistent child keeps its chains
    (every draw, calibration draws included, continues them). By name, ``make_sampler(
    "calibrated", n, backend="gibbs", backend_kwargs={...})`` builds the child first.

    Parameters
    ----------
    backend
        The wrapped sampler instance (``make_sampler("calibrated", ...)`` builds it from a
        registered name and ``backend_kwargs``, ``"dimod"`` by default).
    method
        Estimator of ``b``: ``"energy"`` or ``"pseudolikelihood"`` (see
        :func:`estimate_effective_beta`).
    calibrate_every
        Recalibrate every this many calls (the prior changes during training); 0 calibrates
        only on the first call.
    max_iter
        Most backend draws per calibration.
    tol
        Accepted ``|b - 1|``.
    beta_bounds, reference_sweeps, max_reference_chains, seed
        Passed to :func:`estimate_effective_beta`.

    Notes
    -----
    Only a global temperature is corrected. A backend whose schedule scales with the problem
    (``dwave-samplers``' simulated annealing without an explicit ``beta_range``, a QPU with
    ``auto_scale``) cannot be calibrated this way: rescaling does not change its samples,
    which is detected and warned about. Annealers that freeze out before equilibrating have
    no single effective temperature; the calibrated mean energy is then right but marginals
    and correlations can remain biased.

    """

    name = "calibrated"
    #: Largest relative standard error of an estimate that still rescales the problem.
    MAX_RELATIVE_SE = 0.25

    def __init__(
        self,
        backend: BoltzmannSampler,
        *,
        method: CalibrationMethod = "energy",
        calibrate_every: int = 100,
        max_iter: int = 5,
        tol: float = 0.02,
        beta_bounds: tuple[float, float] = (1e-2, 1e2),
        reference_sweeps: int = 5,
        max_reference_chains: int = 256,
        seed: int = 0,
    ):
        super().__init__()
        if method not in ("energy", "pseudolikelihood"):
            raise ValueError(f"`method` must be 'energy' or 'pseudolikelihood', got {method!r}.")
        if calibrate_every < 0 or max_iter < 1 or tol <= 0:
            raise ValueError(
                "CalibratedSampler needs calibrate_every >= 0, max_iter >= 1 and tol > 0; got "
                f"{calibrate_every}, {max_iter}, {tol}."
            )
        if not isinstance(backend, BoltzmannSampler):
            raise TypeError(
                "CalibratedSampler wraps a sampler instance (a BoltzmannSampler), got "
                f"{type(backend).__name__}; by name use make_sampler('calibrated', n, "
                "backend=NAME, backend_kwargs={...})."
            )
        if isinstance(backend, CalibratedSampler):
            raise ValueError("A calibrated sampler cannot wrap another calibrated sampler.")
        self.n_units = getattr(backend, "n_units", None)
        self.backend = backend
        self.method = method
        self.calibrate_every = calibrate_every
        self.max_iter = max_iter
        self.tol = tol
        self.beta_bounds = (float(beta_bounds[0]), float(beta_bounds[1]))
        self.reference_sweeps = reference_sweeps
        self.max_reference_chains = max_reference_chains
        self.seed = seed
        self.register_buffer("scale", torch.ones((), dtype=torch.float64))
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    @property
    def properties(self) -> dict:
        # Declared honestly from the child: the wrapper neither adds nor drops persistence.
        child = self.backend.properties
        return {**child, "child": child}

    @property
    def sweeps_per_read(self) -> int:
        # A draw costs what the child's does (a calibrating call repeats it up to max_iter).
        return self.backend.sweeps_per_read

    def preflight(self) -> None:
        """Check the wrapped backend (:meth:`BoltzmannSampler.preflight`)."""
        self.backend.preflight()

    def random_state(self) -> dict:
        # The wrapper's own draws are seeded afresh per calibration; the child's are not.
        return {"backend": self.backend.random_state()}

    def set_random_state(self, state: dict) -> None:
        self.backend.set_random_state(state["backend"])

    def estimate(self, samples, h, W, n_visible) -> float:
        """Inverse temperature of ``samples`` with respect to ``(h, W)``."""
        return estimate_effective_beta(
            samples,
            h,
            W,
            n_visible,
            method=self.method,
            beta_bounds=self.beta_bounds,
            reference_sweeps=self.reference_sweeps,
            max_reference_chains=self.max_reference_chains,
            seed=self.seed,
        )

    def _due(self) -> bool:
        calls = int(self.calls)
        if calls == 0:
            return True
        return self.calibrate_every > 0 and calls % self.calibrate_every == 0

    def _sample(self, h, W, num_reads, n_visible):
        due = self._due()
        self.calls.add_(1)
        scale = float(self.scale)
        if not due:
            result = self.backend.sample(
                scale * h, scale * W, num_reads, n_visible=n_visible, check=False
            )
            return result.samples, {**self._backend_info(result), "effective_beta": 1.0 / scale}
        history: list[tuple[float, float]] = []
        informative = converged = False
        for _ in range(self.max_iter):
            result = self.backend.sample(
                scale * h, scale * W, num_reads, n_visible=n_visible, check=False
            )
            b = self.estimate(result.samples, h, W, n_visible)
            se = self._standard_error(result.samples, h, W)
            history.append((scale, b))
            informative = se < self.MAX_RELATIVE_SE * b
            if not informative:
                break
            # Within tol, or within two standard errors: another draw could not tell better.
            converged = abs(b - 1.0) < max(self.tol, 2.0 * se)
            if converged:
                break
            scale /= b
        self._warn_if_scale_invariant(history)
        used_scale, target_beta = history[-1]
        # Keep the last update even if the returned draw predates it: the next call uses it.
        self.scale.fill_(scale)
        info = {
            **self._backend_info(result),
            # An uninformative draw's estimate is noise: report the temperature in use.
            "effective_beta": target_beta / used_scale if informative else 1.0 / scale,
            "target_beta": target_beta,
            "calibration_draws": len(history),
            "calibration_converged": converged,
            "calibration_informative": informative,
        }
        return result.samples, info

    @staticmethod
    def _standard_error(samples, h, W) -> float:
        """Standard error ``1 / sqrt(N Var E)`` of the maximum-likelihood ``b`` of samples.

        A nearly flat prior (the start of training) or identical samples leave ``b``
        undetermined (infinite error); rescaling by such an estimate would send the backend a
        problem 100 times too cold or too hot.
        """
        energies = boltzmann_energy(samples.double(), h.double(), W.double())
        variance = float(energies.var()) if energies.numel() > 1 else 0.0
        if variance <= 0.0:
            return math.inf
        return 1.0 / math.sqrt(energies.numel() * variance)

    @staticmethod
    def _backend_info(result) -> dict:
        # The backend's own timing is part of this call's; keep its other details.
        return {k: v for k, v in result.info.items() if k not in ("seconds", "sampler")} | {
            "backend": result.info.get("backend", result.info.get("sampler"))
        }

    @staticmethod
    def _warn_if_scale_invariant(history: list[tuple[float, float]]) -> None:
        # A backend sampling exp(-beta_B E') for whatever E' it gets has b proportional to the
        # scale (elasticity 1); one whose schedule follows the problem has elasticity 0.
        for (s0, b0), (s1, b1) in itertools.pairwise(history):
            step = abs(math.log(s1 / s0))
            if step > 0.2 and abs(math.log(b1 / b0)) < 0.25 * step:
                warnings.warn(
                    "Rescaling the problem did not change the backend's effective temperature "
                    f"(scale {s0:.3g} -> {s1:.3g}, beta {b0:.3g} -> {b1:.3g}): its schedule "
                    "scales with the problem (e.g. simulated annealing without `beta_range`), "
                    "so it cannot be calibrated; give it a fixed temperature schedule.",
                    RuntimeWarning,
                    stacklevel=4,
                )
                return

    def extra_repr(self) -> str:
        return (
            f"method={self.method!r}, calibrate_every={self.calibrate_every}, "
            f"max_iter={self.max_iter}, tol={self.tol}, effective_beta={1 / float(self.scale):.4g}"
        )
