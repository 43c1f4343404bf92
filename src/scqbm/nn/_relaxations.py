"""Continuous relaxations of factorial Bernoulli posteriors over binary latents.

Each relaxation is a mixture ``r(zeta) = (1 - q) r(zeta | z=0) + q r(zeta | z=1)`` on [0, 1]
with an analytic inverse CDF, so ``rsample`` is reparameterised in the Bernoulli
probabilities ``q`` (Rolfe 2016, DVAE; Vahdat et al. 2018, DVAE++). The decoder sees ``zeta``;
the KL to the Boltzmann prior is computed on the binary ``z`` (see the module).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

RelaxationName = Literal["spike_exp", "overlapping_exp"]
_EPS = 1e-6


class _Relaxation:
    """Shared pieces: Bernoulli parameters, sampling and the Distribution-like surface."""

    #: Registered name, as accepted by ``relaxation=``.
    name: str = ""

    def __init__(self, logits: torch.Tensor, beta: float):
        if beta <= 0:
            raise ValueError(f"`beta` (relaxation sharpness) must be positive, got {beta}.")
        self.logits = logits
        self.beta = float(beta)

    @property
    def probs(self) -> torch.Tensor:
        """Bernoulli probabilities ``q(z_i = 1 | x)``."""
        return torch.sigmoid(self.logits)

    @property
    def batch_shape(self) -> torch.Size:
        return self.logits.shape

    def _clamped_probs(self) -> torch.Tensor:
        return self.probs.clamp(_EPS, 1.0 - _EPS)

    def rsample(self, sample_shape: torch.Size | tuple = ()) -> torch.Tensor:
        """Reparameterised sample of ``zeta`` (differentiable in ``logits``)."""
        shape = torch.Size(sample_shape) + self.logits.shape
        rho = torch.rand(shape, device=self.logits.device, dtype=self.logits.dtype)
        return self.icdf(rho)

    def sample(self, sample_shape: torch.Size | tuple = ()) -> torch.Tensor:
        with torch.no_grad():
            return self.rsample(sample_shape)

    def sample_conditional(self, z: torch.Tensor) -> torch.Tensor:
        """Draw ``zeta ~ r(zeta | z)`` for binary ``z`` (used to decode prior samples)."""
        rho = torch.rand(z.shape, device=z.device, dtype=z.dtype)
        return self.conditional_icdf(z, rho)

    # Implemented by subclasses.
    def icdf(self, rho: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def cdf(self, zeta: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @property
    def mean(self) -> torch.Tensor:
        raise NotImplementedError

    def conditional_icdf(self, z: torch.Tensor, rho: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(batch_shape={tuple(self.batch_shape)}, beta={self.beta})"


def _exp_icdf_increasing(u: torch.Tensor, beta: float) -> torch.Tensor:
    """Inverse CDF of ``beta e^{beta x} / (e^beta - 1)`` on [0, 1]."""
    return torch.log1p(u * math.expm1(beta)) / beta


def _exp_mean_decreasing(beta: float) -> float:
    """Mean of ``beta e^{-beta x} / (1 - e^{-beta})`` on [0, 1]."""
    return 1.0 / beta - 1.0 / math.expm1(beta)


class SpikeAndExponential(_Relaxation):
    """Spike-and-exponential smoothing (Rolfe 2016).

    ``r(zeta|0) = delta(zeta)`` and ``r(zeta|1) = beta e^{beta zeta} / (e^beta - 1)`` on [0, 1].

    ``zeta = 0`` if ``rho <= 1 - q``, else
    ``(1/beta) log(((rho - (1 - q)) / q)(e^beta - 1) + 1)`` with ``rho ~ U(0, 1)``.
    """

    name = "spike_exp"

    def icdf(self, rho: torch.Tensor) -> torch.Tensor:
        q = self._clamped_probs()
        u = ((rho - (1.0 - q)) / q).clamp(0.0, 1.0)
        return torch.where(rho > 1.0 - q, _exp_icdf_increasing(u, self.beta), torch.zeros_like(u))

    def cdf(self, zeta: torch.Tensor) -> torch.Tensor:
        q = self.probs
        inside = (1.0 - q) + q * torch.expm1(self.beta * zeta.clamp(0, 1)) / math.expm1(self.beta)
        return torch.where(
            zeta < 0,
            torch.zeros_like(inside),
            torch.where(zeta >= 1, torch.ones_like(inside), inside),
        )

    @property
    def mean(self) -> torch.Tensor:
        return self.probs * (1.0 - _exp_mean_decreasing(self.beta))

    def conditional_icdf(self, z: torch.Tensor, rho: torch.Tensor) -> torch.Tensor:
        return z * _exp_icdf_increasing(rho, self.beta)


class OverlappingExponential(_Relaxation):
    """DVAE++ overlapping exponentials (Vahdat et al. 2018).

    ``r(zeta|0) = beta e^{-beta zeta} / (1 - e^{-beta})`` and
    ``r(zeta|1)(zeta) = r(1 - zeta | 0)``, both on [0, 1].

    With ``u = e^{-beta zeta}`` the mixture CDF equation ``F(zeta) = rho`` is the quadratic
    ``(1-q) u^2 + b u - q e^{-beta} = 0`` with ``b = rho (1 - e^{-beta}) - (1-q) + q e^{-beta}``,
    solved with the cancellation-free form of the positive root.
    """

    name = "overlapping_exp"

    def icdf(self, rho: torch.Tensor) -> torch.Tensor:
        q = self._clamped_probs()
        e = math.exp(-self.beta)
        a = 1.0 - q
        b = rho * (1.0 - e) - a + q * e
        c = q * e  # the quadratic's constant term is -c
        root = torch.sqrt(b * b + 4.0 * a * c)
        # torch.where differentiates both branches: in the unused one b + root can round to 0
        # (b < 0, 4ac << b^2), and 0 * inf would turn the gradient into NaN. Give each branch
        # a denominator that is safe where it is not selected.
        positive = b >= 0
        one = torch.ones_like(b)
        u = torch.where(
            positive,
            2.0 * c / torch.where(positive, b + root, one),
            (root - b) / torch.where(positive, one, 2.0 * a),
        )
        return (-torch.log(u) / self.beta).clamp(0.0, 1.0)

    def cdf(self, zeta: torch.Tensor) -> torch.Tensor:
        q = self.probs
        e = math.exp(-self.beta)
        x = zeta.clamp(0, 1)
        cdf0 = -torch.expm1(-self.beta * x) / (1.0 - e)
        cdf1 = (torch.exp(-self.beta * (1.0 - x)) - e) / (1.0 - e)
        return (1.0 - q) * cdf0 + q * cdf1

    @property
    def mean(self) -> torch.Tensor:
        m0 = _exp_mean_decreasing(self.beta)
        q = self.probs
        return (1.0 - q) * m0 + q * (1.0 - m0)

    def conditional_icdf(self, z: torch.Tensor, rho: torch.Tensor) -> torch.Tensor:
        # zeta | z=0 has inverse CDF -log(1 - rho (1 - e^-beta)) / beta; zeta | z=1 mirrors it.
        zeta0 = -torch.log1p(-rho * (-math.expm1(-self.beta))) / self.beta
        return torch.where(z > 0.5, 1.0 - zeta0, zeta0)


RELAXATIONS: dict[str, type[_Relaxation]] = {
    SpikeAndExponential.name: SpikeAndExponential,
    OverlappingExponential.name: OverlappingExponential,
}


def make_relaxation(name: str, logits: torch.Tensor, beta: float) -> _Relaxation:
    """Build the relaxation registered under ``name`` for the given encoder logits."""
    try:
        cls = RELAXATIONS[name]
    except KeyError:
        raise ValueError(
            f"Unknown relaxation {name!r}; choose one of {sorted(RELAXATIONS)}."
        ) from None
    return cls(logits, beta)


def bernoulli_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of factorial Bernoulli(sigmoid(logits)), summed over the last axis.

    ``H = sum softplus(l) - q l``, stable for large ``|l|``.
    """
    return (F.softplus(logits) - torch.sigmoid(logits) * logits).sum(-1)
