"""The Boltzmann energy, written once for priors, samplers and tests."""

from __future__ import annotations

import torch


def boltzmann_energy(z: torch.Tensor, h: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """``E(z) = -h.z - z'Wz`` for states (or probabilities) ``z`` of shape ``(..., n)``."""
    return -(z @ h) - ((z @ W) * z).sum(-1)


def bipartite_energy(z: torch.Tensor, h: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """The same energy for a bipartite ``W`` given by its block ``B`` (``n_visible x n_hidden``).

    ``W`` couples ``[0, n_visible)`` to ``[n_visible, n)`` only, so ``z'Wz = 2 v'B u`` with
    ``v, u`` the two sides: a product with ``B`` instead of the dense ``(n, n)`` matrix, a
    quarter of the work for an even split (the RBM prior's KL, drift and AIS).
    """
    n_visible = B.shape[0]
    visible, hidden = z[..., :n_visible], z[..., n_visible:]
    return -(z @ h) - 2.0 * ((visible @ B) * hidden).sum(-1)
