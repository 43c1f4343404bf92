"""Gibbs transition kernels for Boltzmann machines over {0, 1}^n.

The conditional of unit ``i`` under ``E(z) = -h.z - z'Wz`` (``W`` symmetric, zero diagonal) is
``p(z_i = 1 | z_-i) = sigmoid(h_i + 2 (W z)_i)``. Both kernels leave the Boltzmann distribution
invariant; ``field_scale`` and ``coupling_scale`` multiply ``h`` and ``W`` so the same kernels
serve annealed importance sampling (``coupling_scale = beta``) and tempering (both ``= beta``).
Scales may be floats or tensors of shape ``(n_chains, 1)`` (one temperature per chain).
"""

from __future__ import annotations

import functools

import numpy as np
import torch


def _bernoulli(logits: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    uniform = torch.rand(
        logits.shape, generator=generator, device=logits.device, dtype=logits.dtype
    )
    return (uniform < torch.sigmoid(logits)).to(logits.dtype)


@functools.cache
def _numba_dense_sweep():
    """Compiled single-site sweep for CPU tensors, or ``None`` without numba.

    A dense sweep is ``n`` dependent updates; in torch each costs several op dispatches
    (~100 us on a CPU), which made AIS and dense-prior sampling dominate training. The
    compiled loop does the same arithmetic with the same random numbers.
    """
    try:
        import numba
    except ImportError:  # pragma: no cover - numba comes with scanpy
        return None

    @numba.njit(cache=True, nogil=True)
    def sweep(z, local, thresholds, W, coupling, order):  # pragma: no cover - compiled
        n_chains = z.shape[0]
        n = z.shape[1]
        for c in range(n_chains):
            for k in range(order.shape[0]):
                i = order[k]
                new = 1.0 if local[c, i] > thresholds[c, i] else 0.0
                delta = new - z[c, i]
                if delta != 0.0:
                    z[c, i] = new
                    step = coupling[c] * delta
                    for j in range(n):
                        local[c, j] += step * W[i, j]

    return sweep


def dense_gibbs_sweep(
    z: torch.Tensor,
    h: torch.Tensor,
    W: torch.Tensor,
    *,
    field_scale: float | torch.Tensor = 1.0,
    coupling_scale: float | torch.Tensor = 1.0,
    order: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    compiled: bool | None = None,
) -> torch.Tensor:
    """One systematic-scan Gibbs sweep of a dense Boltzmann machine, all chains in parallel.

    Units are updated one at a time (a synchronous update of all units is not a Gibbs sampler
    for a dense coupling matrix); the local fields are kept up to date after every flip, so a
    sweep costs ``O(n_chains * n^2)``.

    Parameters
    ----------
    z
        Chain states, shape ``(n_chains, n)``, values in {0, 1}. Not modified.
    h, W
        Fields ``(n,)`` and symmetric zero-diagonal couplings ``(n, n)``.
    field_scale, coupling_scale
        Multipliers of ``h`` and ``W`` (inverse temperatures).
    order
        Update order (a permutation of ``range(n)``); defaults to ``0 .. n-1``.
    generator
        Random generator for reproducibility.
    compiled
        Use the numba kernel (default: for CPU tensors when numba is importable). Both paths
        consume the same random numbers and give the same result.

    Returns
    -------
    New chain states, shape ``(n_chains, n)``.

    """
    n_chains, n = z.shape
    coupling = 2.0 * coupling_scale
    local = field_scale * h + coupling * (z @ W)  # (n_chains, n)
    # Unit i turns on iff its local field exceeds logit(u): the same draw as u < sigmoid(field).
    uniform = torch.rand(z.shape, generator=generator, device=z.device, dtype=z.dtype)
    thresholds = torch.logit(uniform)
    order = torch.arange(n, device=z.device) if order is None else order
    kernel = _numba_dense_sweep() if compiled is not False and z.device.type == "cpu" else None
    if kernel is not None:
        z_np = z.detach().to(torch.float64).numpy().copy()
        local_np = local.detach().to(torch.float64).numpy().copy()
        per_chain = torch.as_tensor(coupling, dtype=torch.float64).expand(n_chains, 1)
        kernel(
            z_np,
            local_np,
            thresholds.detach().to(torch.float64).numpy(),
            W.detach().to(torch.float64).numpy(),
            per_chain.reshape(-1).contiguous().numpy(),
            order.cpu().numpy().astype(np.int64),
        )
        return torch.from_numpy(z_np).to(z.dtype)
    z = z.clone()
    for i in order.tolist():
        new = (local[:, i] > thresholds[:, i]).to(z.dtype)
        delta = new - z[:, i]
        z[:, i] = new
        local = local + coupling * delta.unsqueeze(-1) * W[i]
    return z


def bipartite_gibbs_sweep(
    z: torch.Tensor,
    h: torch.Tensor,
    W: torch.Tensor,
    n_visible: int,
    *,
    field_scale: float | torch.Tensor = 1.0,
    coupling_scale: float | torch.Tensor = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One block Gibbs sweep of a restricted Boltzmann machine (hidden block, then visible).

    Units ``[0, n_visible)`` form one side and ``[n_visible, n)`` the other; ``W`` has non-zero
    entries only between the sides, so each side is conditionally independent given the other.
    """
    visible, hidden = z[:, :n_visible], z[:, n_visible:]
    B = W[:n_visible, n_visible:]
    coupling = 2.0 * coupling_scale
    hidden = _bernoulli(field_scale * h[n_visible:] + coupling * (visible @ B), generator)
    visible = _bernoulli(field_scale * h[:n_visible] + coupling * (hidden @ B.T), generator)
    return torch.cat([visible, hidden], dim=-1)


def gibbs_sweep(
    z: torch.Tensor,
    h: torch.Tensor,
    W: torch.Tensor,
    n_visible: int | None = None,
    **kwargs,
) -> torch.Tensor:
    """Dispatch to the block kernel for bipartite couplings, else the dense kernel."""
    if n_visible is None:
        return dense_gibbs_sweep(z, h, W, **kwargs)
    kwargs.pop("order", None)
    return bipartite_gibbs_sweep(z, h, W, n_visible, **kwargs)
