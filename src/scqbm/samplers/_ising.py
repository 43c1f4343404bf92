"""Exact conversion of a Boltzmann machine to the Ising form of Ising hardware (the CIM).

A Boltzmann machine over ``z`` in {0, 1}^n with ``E(z) = -h.z - z'Wz`` (``W`` symmetric, zero
diagonal) is an Ising problem over spins ``s = 2z - 1`` with fields and couplings. Ising
machines such as QBoson's CIM accept couplings only, so the fields become couplings to one
auxiliary spin ``s_a`` (the last one). The result uses the kaiwu SDK's convention: a symmetric,
zero-diagonal matrix ``J`` of size ``n + 1`` whose energy, to be minimised (or sampled at unit
temperature), is

``H(s) = -s'Js = -2 sum_{i<j} J_ij s_i s_j``,

with ``J_ij = W_ij / 4`` between units and ``J_ia = (h_i + sum_j W_ij) / 4`` to the auxiliary
spin. Then ``E(z) = H(s) + offset`` with ``z_i = (1 + s_i s_a) / 2`` and ``offset = -sum(h) / 2
- sum(W) / 4``. ``H`` is invariant under flipping every spin, so each state ``z`` has two
spin configurations; gauge fixing (flip all spins when ``s_a = -1``) picks one.

This module needs only numpy, so that it also loads in a Python 3.10 environment that has
the kaiwu SDK but not the rest of scqbm.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Spins of QBoson's current coherent Ising machine (the auxiliary spin included).
CIM_MAX_SPINS = 550
#: Bit width of the CIM's couplings: signed integers in [-127, 127].
CIM_BIT_WIDTH = 8


@dataclass(frozen=True)
class IsingProblem:
    """A Boltzmann machine as an Ising matrix with an auxiliary spin.

    Attributes
    ----------
    J
        ``(n + 1, n + 1)`` symmetric zero-diagonal couplings; the last spin is the auxiliary
        one. Energy ``H(s) = -s'Js``.
    offset
        ``E(z) = H(s) + offset`` for ``s`` the spins of ``z``.

    """

    J: np.ndarray
    offset: float

    @property
    def n_spins(self) -> int:
        """Number of spins, the auxiliary spin included."""
        return self.J.shape[0]


def boltzmann_to_ising(h, W) -> IsingProblem:
    """Exact Ising form (auxiliary spin last, kaiwu convention) of ``E(z) = -h.z - z'Wz``.

    Parameters
    ----------
    h, W
        Fields ``(n,)`` and symmetric zero-diagonal couplings ``(n, n)`` (arrays or CPU
        tensors).

    """
    h = np.asarray(h, dtype=np.float64)
    W = np.asarray(W, dtype=np.float64)
    n = h.shape[0]
    J = np.zeros((n + 1, n + 1))
    J[:n, :n] = W / 4.0
    link = (h + W.sum(axis=1)) / 4.0
    J[:n, n] = link
    J[n, :n] = link
    return IsingProblem(J, float(-h.sum() / 2.0 - W.sum() / 4.0))


def ising_energy(spins: np.ndarray, J: np.ndarray) -> np.ndarray:
    """``H(s) = -s'Js`` of spin configurations ``(..., n_spins)`` with values +-1."""
    spins = np.asarray(spins, dtype=np.float64)
    return -np.einsum("...i,ij,...j->...", spins, J, spins)


def binary_to_spins(z: np.ndarray) -> np.ndarray:
    """Spins ``(..., n + 1)`` of binary states ``(..., n)``, auxiliary spin ``+1`` (one gauge)."""
    z = np.asarray(z, dtype=np.float64)
    aux = np.ones((*z.shape[:-1], 1))
    return np.concatenate([2.0 * z - 1.0, aux], axis=-1)


def spins_to_binary(spins: np.ndarray) -> np.ndarray:
    """Binary states ``(k, n)`` of spin configurations ``(k, n + 1)`` in either gauge.

    Gauge fixing: a configuration whose auxiliary spin is ``-1`` is the global flip of one
    whose auxiliary spin is ``+1`` with the same energy, so ``z_i = (1 + s_i s_a) / 2``.
    """
    spins = np.asarray(spins, dtype=np.float64)
    if spins.ndim != 2 or not np.isin(spins, (-1.0, 1.0)).all():
        raise ValueError(
            "Expected a 2-d array of spin configurations with values -1 and +1; got shape "
            f"{spins.shape} with values {np.unique(spins)[:5]}."
        )
    return (1.0 + spins[:, :-1] * spins[:, -1:]) / 2.0


def reduce_precision(
    J: np.ndarray, bit_width: int = CIM_BIT_WIDTH, scale: float | None = None
) -> tuple[np.ndarray, float]:
    """Round couplings to the signed integers a ``bit_width``-bit Ising machine accepts.

    Parameters
    ----------
    J
        Couplings.
    bit_width
        Bits per coupling, one of them the sign: values in ``[-(2^(b-1) - 1), 2^(b-1) - 1]``.
    scale
        Integer units per unit of ``J``. ``None`` maps the largest ``|J_ij|`` to the largest
        integer (the finest resolution, but the problem's overall scale is lost, so the
        machine's effective temperature cannot be tuned by rescaling). A fixed ``scale`` keeps
        rescaling meaningful; couplings beyond the range then raise an error.

    Returns
    -------
    The integer matrix and the scale used: ``J ≈ J_int / scale`` with ``|J_int / scale - J| <=
    0.5 / scale`` entrywise, so energies ``-s'Js`` change by at most ``0.5 / scale`` times the
    number of non-zero entries.

    """
    if bit_width < 2:
        raise ValueError(f"`bit_width` must be at least 2 (one bit is the sign), got {bit_width}.")
    J = np.asarray(J, dtype=np.float64)
    levels = 2 ** (bit_width - 1) - 1
    largest = float(np.abs(J).max())
    if scale is None:
        scale = levels / largest if largest > 0 else 1.0
    elif not scale > 0:
        raise ValueError(f"`scale` must be positive, got {scale}.")
    scaled = J * scale
    if np.abs(scaled).max() > levels + 0.5:
        raise ValueError(
            f"With scale {scale:.4g} the largest coupling {largest:.4g} needs "
            f"{np.abs(scaled).max():.1f} levels; a {bit_width}-bit machine has {levels}. "
            "Use a smaller scale (or scale=None to fit the range)."
        )
    return np.rint(scaled).astype(np.int64), float(scale)


def check_spin_capacity(n_spins: int, max_spins: int | None, machine: str = "the machine") -> None:
    """Raise a clear ``ValueError`` when a problem needs more spins than ``machine`` has."""
    if max_spins is not None and n_spins > max_spins:
        raise ValueError(
            f"The Ising problem needs {n_spins} spins ({n_spins - 1} latent units plus the "
            f"auxiliary spin for the fields); {machine} has {max_spins}. Use at most "
            f"{max_spins - 1} latent units, or a classical backend."
        )
