"""The Ising form sent to Ising machines: exact energies, gauge, precision, capacity."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import random_problem

from scqbm.prior import boltzmann_energy, enumerate_states
from scqbm.samplers import (
    binary_to_spins,
    boltzmann_to_ising,
    ising_energy,
    reduce_precision,
    spins_to_binary,
)
from scqbm.samplers._ising import CIM_MAX_SPINS, check_spin_capacity


def prior_problem(structure, n, seed, scale=1.0):
    prior = random_problem(n, structure, scale=scale, seed=seed)
    return prior.h.detach().double(), prior.coupling_matrix().detach().double()


@pytest.mark.parametrize("structure,seed", [("bm", 0), ("bm", 1), ("rbm", 2)])
def test_ising_energy_is_the_prior_energy_plus_a_constant_for_every_state(structure, seed):
    h, W = prior_problem(structure, 10, seed)
    problem = boltzmann_to_ising(h, W)
    J = problem.J
    assert J.shape == (11, 11) and np.allclose(J, J.T) and not np.diag(J).any()
    z = enumerate_states(10, dtype=torch.float64)
    energy = boltzmann_energy(z, h, W).numpy()
    spins = binary_to_spins(z.numpy())
    # Both gauges of every state: H is invariant under flipping all spins.
    for gauge in (spins, -spins):
        assert np.allclose(ising_energy(gauge, J) + problem.offset, energy, atol=1e-10)
        assert np.array_equal(spins_to_binary(gauge), z.numpy())


def test_the_auxiliary_spin_carries_the_fields():
    # Without fields and couplings beyond one pair the links are the row sums (W_ij + h_i) / 4.
    h = torch.tensor([1.0, -2.0, 0.0], dtype=torch.float64)
    W = torch.zeros(3, 3, dtype=torch.float64)
    W[0, 1] = W[1, 0] = 0.5
    J = boltzmann_to_ising(h, W).J
    assert np.allclose(J[:3, 3], [(1.0 + 0.5) / 4, (-2.0 + 0.5) / 4, 0.0])
    assert J[0, 1] == pytest.approx(0.125) and J[0, 2] == 0.0


def test_spins_to_binary_rejects_non_spins():
    with pytest.raises(ValueError, match="-1 and \\+1"):
        spins_to_binary(np.array([[0.0, 1.0, 1.0]]))


@pytest.mark.parametrize("bit_width", [4, 8])
def test_precision_reduction_is_bounded_for_every_state(bit_width):
    h, W = prior_problem("bm", 9, seed=3)
    J = boltzmann_to_ising(h, W).J
    J_int, scale = reduce_precision(J, bit_width)
    levels = 2 ** (bit_width - 1) - 1
    assert J_int.dtype.kind == "i" and np.abs(J_int).max() == levels
    assert np.array_equal(J_int, J_int.T) and not np.diag(J_int).any()
    assert np.abs(J_int / scale - J).max() <= 0.5 / scale + 1e-12
    # Energies move by at most half a level per non-zero entry, for every configuration.
    spins = binary_to_spins(enumerate_states(9, dtype=torch.float64).numpy())
    error = np.abs(ising_energy(spins, J_int) / scale - ising_energy(spins, J))
    assert error.max() <= 0.5 / scale * np.count_nonzero(J) + 1e-9
    # The bound is not vacuous: the coarse width really loses precision.
    assert error.max() > 0


def test_fixed_precision_scale_keeps_rescaling_meaningful():
    J = boltzmann_to_ising(*prior_problem("rbm", 8, seed=4)).J
    _, auto = reduce_precision(J)
    half, scale = reduce_precision(J, scale=auto / 2)
    doubled, _ = reduce_precision(2 * J, scale=auto / 2)
    assert scale == auto / 2 and np.abs(doubled - 2 * half).max() <= 1
    # With the automatic scale, rescaling the problem sends the same integers.
    assert np.array_equal(reduce_precision(2 * J)[0], reduce_precision(J)[0])
    with pytest.raises(ValueError, match="8-bit machine has 127"):
        reduce_precision(J, scale=2 * auto)


def test_spin_capacity():
    check_spin_capacity(CIM_MAX_SPINS, CIM_MAX_SPINS)
    check_spin_capacity(10_000, None)
    with pytest.raises(ValueError, match=r"needs 551 spins \(550 latent units plus the auxiliary"):
        check_spin_capacity(CIM_MAX_SPINS + 1, CIM_MAX_SPINS, "the CIM")
