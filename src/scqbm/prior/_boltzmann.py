"""Boltzmann-machine priors over binary latents: p(z) = exp(-E(z)) / Z, E(z) = -h.z - z'Wz."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from ._energy import boltzmann_energy
from ._log_partition import (
    MAX_EXACT_UNITS,
    LogPartitionEstimate,
    ais_log_partition,
    exact_log_partition,
    n_enumerated_units,
)

PriorStructure = Literal["bm", "rbm"]


class BoltzmannPrior(nn.Module):
    """Boltzmann machine over ``n_units`` binary units.

    Parameters
    ----------
    n_units
        Number of binary latent units.
    structure
        ``"bm"``: fully connected, ``W`` symmetric with zero diagonal (the QBM-VAE paper).
        ``"rbm"``: bipartite; units ``[0, n_visible)`` couple only to ``[n_visible, n)``, which
        allows block Gibbs sampling and exact log Z by enumerating the smaller side.
    n_visible
        Size of the first side of an RBM (default ``n_units // 2``). Ignored for ``"bm"``.
    init_scale
        Standard deviation of the initial couplings (fields start at zero).

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
    ):
        super().__init__()
        if structure not in ("bm", "rbm"):
            raise ValueError(f"`prior` must be 'bm' or 'rbm', got {structure!r}.")
        if n_units < 2:
            raise ValueError(f"A Boltzmann prior needs at least 2 latent units, got {n_units}.")
        self.n_units = n_units
        self.structure = structure
        self.h = nn.Parameter(torch.zeros(n_units))
        if structure == "bm":
            self.n_visible = None
            rows, cols = torch.triu_indices(n_units, n_units, offset=1)
            self.register_buffer("_rows", rows, persistent=False)
            self.register_buffer("_cols", cols, persistent=False)
            self.couplings = nn.Parameter(init_scale * torch.randn(rows.numel()))
        else:
            self.n_visible = n_units // 2 if n_visible is None else int(n_visible)
            if not 0 < self.n_visible < n_units:
                raise ValueError(
                    f"`n_visible` must be between 1 and n_latent - 1 = {n_units - 1}, "
                    f"got {self.n_visible}."
                )
            n_hidden = n_units - self.n_visible
            self.couplings = nn.Parameter(init_scale * torch.randn(self.n_visible, n_hidden))

    def coupling_matrix(self) -> torch.Tensor:
        """Dense symmetric zero-diagonal ``W`` of shape ``(n, n)`` (differentiable)."""
        n = self.n_units
        if self.structure == "bm":
            upper = torch.zeros(n, n, device=self.h.device, dtype=self.h.dtype)
            upper = upper.index_put((self._rows, self._cols), self.couplings)
            return upper + upper.T
        nv = self.n_visible
        W = torch.zeros(n, n, device=self.h.device, dtype=self.h.dtype)
        W = W.index_put(
            (
                torch.arange(nv, device=W.device).unsqueeze(-1),
                torch.arange(nv, n, device=W.device),
            ),
            self.couplings,
        )
        return W + W.T

    def energy(self, z: torch.Tensor, W: torch.Tensor | None = None) -> torch.Tensor:
        """Energy ``E(z) = -h.z - z'Wz`` of binary states ``z`` of shape ``(..., n)``."""
        W = self.coupling_matrix() if W is None else W
        return boltzmann_energy(z, self.h, W)

    def expected_energy(self, probs: torch.Tensor, W: torch.Tensor | None = None) -> torch.Tensor:
        """``E_q[E(z)]`` under the factorial Bernoulli ``q`` with the given probabilities.

        Exact, because ``E[z_i z_j] = q_i q_j`` for ``i != j`` and ``W`` has a zero diagonal; it
        is therefore the energy formula evaluated at ``q``.
        """
        return self.energy(probs, W)

    def can_enumerate(self) -> bool:
        """Whether exact log Z is within :data:`MAX_EXACT_UNITS` enumerated units."""
        return n_enumerated_units(self.n_units, self.n_visible) <= MAX_EXACT_UNITS

    def log_partition_exact(self) -> torch.Tensor:
        """Exact log Z (differentiable); raises ``LatentTooLargeError`` beyond the limit."""
        return exact_log_partition(self.h, self.coupling_matrix(), self.n_visible)

    @torch.no_grad()
    def log_partition(
        self,
        method: Literal["auto", "exact", "ais"] = "auto",
        **ais_kwargs,
    ) -> LogPartitionEstimate:
        """Estimate log Z: exact for ``"exact"`` (or ``"auto"`` when small enough), else AIS."""
        if method not in ("auto", "exact", "ais"):
            raise ValueError(f"`method` must be 'auto', 'exact' or 'ais', got {method!r}.")
        if method == "exact" or (method == "auto" and self.can_enumerate()):
            return LogPartitionEstimate(float(self.log_partition_exact()), 0.0, "exact")
        return ais_log_partition(self.h, self.coupling_matrix(), self.n_visible, **ais_kwargs)

    def extra_repr(self) -> str:
        split = f", n_visible={self.n_visible}" if self.n_visible is not None else ""
        return f"n_units={self.n_units}, structure={self.structure!r}{split}"
