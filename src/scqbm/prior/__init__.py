"""Boltzmann-machine priors: energies, exact and annealed estimates of log Z, Gibbs kernels."""

from ._boltzmann import BoltzmannPrior
from ._energy import boltzmann_energy
from ._gibbs_kernels import bipartite_gibbs_sweep, dense_gibbs_sweep, gibbs_sweep
from ._log_partition import (
    MAX_EXACT_UNITS,
    LatentTooLargeError,
    LogPartitionEstimate,
    ais_log_partition,
    enumerate_states,
    exact_distribution,
    exact_log_partition,
)

__all__ = [
    "MAX_EXACT_UNITS",
    "BoltzmannPrior",
    "LatentTooLargeError",
    "LogPartitionEstimate",
    "ais_log_partition",
    "bipartite_gibbs_sweep",
    "boltzmann_energy",
    "dense_gibbs_sweep",
    "enumerate_states",
    "exact_distribution",
    "exact_log_partition",
    "gibbs_sweep",
]
