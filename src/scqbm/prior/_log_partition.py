"""Estimators of the log partition function log Z of a Boltzmann machine.

``exact_log_partition`` enumerates states (for a bipartite machine only the smaller side, the
other side being summed out analytically with softplus); ``ais_log_partition`` is annealed
importance sampling (Neal 2001; Salakhutdinov & Murray 2008) from the factorial distribution
with the same fields to the full machine, with a delta-method standard error.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ._gibbs_kernels import gibbs_sweep

#: Largest number of enumerated units (2**20 states, a few hundred MB at most in chunks).
MAX_EXACT_UNITS = 20
_CHUNK = 1 << 16


class LatentTooLargeError(ValueError):
    """Raised when exact enumeration of log Z is asked for a prior that is too large."""


@dataclass(frozen=True)
class LogPartitionEstimate:
    """A value of log Z with its standard error (0 for an exact value) and how it was obtained."""

    value: float
    stderr: float
    method: str

    def __iter__(self):
        # Allows ``value, stderr = estimate``.
        return iter((self.value, self.stderr))


def enumerate_states(n: int, device=None, dtype=torch.float32, start: int = 0, stop=None):
    """All binary vectors of length ``n`` with indices in ``[start, stop)``, shape ``(k, n)``."""
    stop = 2**n if stop is None else stop
    codes = torch.arange(start, stop, device=device, dtype=torch.int64)
    bits = torch.arange(n - 1, -1, -1, device=device, dtype=torch.int64)
    return ((codes.unsqueeze(-1) >> bits) & 1).to(dtype)


@functools.lru_cache(maxsize=8)
def _cached_chunk(n: int, device: torch.device, dtype: torch.dtype, start: int, stop: int):
    # Training refreshes an exact log Z every step: building the states dominated its cost.
    return enumerate_states(n, device, dtype, start, stop)


def n_enumerated_units(n_units: int, n_visible: int | None) -> int:
    """How many units exact enumeration has to visit."""
    if n_visible is None:
        return n_units
    return min(n_visible, n_units - n_visible)


def exact_log_partition(
    h: torch.Tensor, W: torch.Tensor, n_visible: int | None = None
) -> torch.Tensor:
    """Exact log Z by enumeration; differentiable with respect to ``h`` and ``W``.

    Parameters
    ----------
    h, W
        Fields ``(n,)`` and symmetric zero-diagonal couplings ``(n, n)``.
    n_visible
        Size of the first side of a bipartite (RBM) machine, or ``None`` for a dense one.

    """
    n = h.shape[-1]
    k = n_enumerated_units(n, n_visible)
    if k > MAX_EXACT_UNITS:
        raise LatentTooLargeError(
            f"Exact log Z needs 2**{k} states ({n} latent units"
            + (f", bipartite {n_visible}/{n - n_visible}" if n_visible is not None else "")
            + f"), more than the limit of 2**{MAX_EXACT_UNITS}. Use `log_partition='ais'` (or "
            "'auto'), or a smaller `n_latent`; an RBM prior enumerates only its smaller side."
        )
    chunks = []
    for start in range(0, 2**k, _CHUNK):
        s = _cached_chunk(k, h.device, h.dtype, start, min(start + _CHUNK, 2**k))
        if n_visible is None:
            chunks.append(torch.logsumexp(s @ h + ((s @ W) * s).sum(-1), dim=0))
            continue
        # Enumerate the smaller side, sum the other out: sum_o exp(a.o) = prod softplus terms.
        if n_visible <= n - n_visible:
            enum_h, other_h, B = h[:n_visible], h[n_visible:], W[:n_visible, n_visible:]
        else:
            enum_h, other_h, B = h[n_visible:], h[:n_visible], W[:n_visible, n_visible:].T
        free = s @ enum_h + F.softplus(other_h + 2.0 * (s @ B)).sum(-1)
        chunks.append(torch.logsumexp(free, dim=0))
    return torch.logsumexp(torch.stack(chunks), dim=0)


def exact_distribution(h: torch.Tensor, W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """All ``2**n`` states and their exact probabilities (for tests and diagnostics)."""
    n = h.shape[-1]
    if n > MAX_EXACT_UNITS:
        raise LatentTooLargeError(
            f"Exact distribution over {n} units is too large (limit {MAX_EXACT_UNITS})."
        )
    states = enumerate_states(n, h.device, h.dtype)
    log_weights = states @ h + ((states @ W) * states).sum(-1)
    return states, torch.softmax(log_weights, dim=0)


@torch.no_grad()
def ais_log_partition(
    h: torch.Tensor,
    W: torch.Tensor,
    n_visible: int | None = None,
    *,
    n_chains: int = 512,
    n_betas: int = 1000,
    generator: torch.Generator | None = None,
) -> LogPartitionEstimate:
    """Annealed importance sampling estimate of log Z.

    The path is ``E_b(z) = -h.z - b z'Wz`` for ``b`` from 0 to 1 in ``n_betas`` linear steps;
    the start is the factorial Bernoulli distribution with logits ``h``, whose log partition
    function is ``sum softplus(h)``. One Gibbs sweep at each intermediate ``b``.

    Returns
    -------
    :class:`LogPartitionEstimate`; ``stderr`` is the delta-method standard error of the log of
    the mean importance weight, ``std(w) / (sqrt(K) mean(w))``.

    """
    h, W = h.detach(), W.detach()
    betas = torch.linspace(0.0, 1.0, n_betas + 1, device=h.device, dtype=h.dtype)
    base_logits = h.expand(n_chains, -1)
    uniform = torch.rand(base_logits.shape, generator=generator, device=h.device, dtype=h.dtype)
    z = (uniform < torch.sigmoid(base_logits)).to(h.dtype)
    log_w = torch.zeros(n_chains, device=h.device, dtype=h.dtype)
    for b_prev, b in zip(betas[:-1].tolist(), betas[1:].tolist(), strict=True):
        log_w += (b - b_prev) * ((z @ W) * z).sum(-1)
        z = gibbs_sweep(z, h, W, n_visible, coupling_scale=b, generator=generator)
    log_z0 = F.softplus(h).sum()
    log_mean_w = torch.logsumexp(log_w, 0) - math.log(n_chains)
    w = torch.exp(log_w - log_w.max())
    stderr = (w.std() / (w.mean() * math.sqrt(n_chains))).item()
    return LogPartitionEstimate(float(log_z0 + log_mean_w), stderr, "ais")
