"""Gibbs transition kernels for Boltzmann machines over {0, 1}^n.

The conditional of unit ``i`` under ``E(z) = -h.z - z'Wz`` (``W`` symmetric, zero diagonal) is
``p(z_i = 1 | z_-i) = sigmoid(h_i + 2 (W z)_i)``. Both kernels leave the Boltzmann distribution
invariant; ``field_scale`` and ``coupling_scale`` multiply ``h`` and ``W`` so the same kernels
serve annealed importance sampling (``coupling_scale = beta``) and tempering (both ``= beta``).
Scales may be floats or tensors of shape ``(n_chains, 1)`` (one temperature per chain).
"""

from __future__ import annotations

import torch


def _bernoulli(logits: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    uniform = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=logits.dtype)
    return (uniform < torch.sigmoid(logits)).to(logits.dtype)


def dense_gibbs_sweep(
    z: torch.Tensor,
    h: torch.Tensor,
    W: torch.Tensor,
    *,
    field_scale: float | torch.Tensor = 1.0,
    coupling_scale: float | torch.Tensor = 1.0,
    order: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
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

    Returns
    -------
    New chain states, shape ``(n_chains, n)``.
    """
    z = z.clone()
    coupling = 2.0 * coupling_scale
    local = field_scale * h + coupling * (z @ W)  # (n_chains, n)
    units = range(z.shape[-1]) if order is None else order.tolist()
    for i in units:
        new = _bernoulli(local[:, i], generator)
        delta = new - z[:, i]
        z[:, i] = new
        # Only chains whose unit flipped change their fields.
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
