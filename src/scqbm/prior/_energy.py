"""The Boltzmann energy, written once for priors, samplers and tests."""

from __future__ import annotations

import torch


def boltzmann_energy(z: torch.Tensor, h: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """``E(z) = -h.z - z'Wz`` for states (or probabilities) ``z`` of shape ``(..., n)``."""
    return -(z @ h) - ((z @ W) * z).sum(-1)
