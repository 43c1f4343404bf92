"""Boltzmann-machine priors: energies, exact and annealed estimates of log Z, Gibbs kernels."""

from ._boltzmann import LOG_Z_MIN_ESS, LOG_Z_TOLERANCE, PRIOR_STRUCTURES, BoltzmannPrior
from ._energy import bipartite_energy, boltzmann_energy
from ._gibbs_kernels import bipartite_gibbs_sweep, dense_gibbs_sweep, gibbs_sweep
from ._log_partition import (
    AIS_FINAL_N_BETAS,
    AIS_FINAL_N_CHAINS,
    AIS_N_BETAS,
    AIS_N_CHAINS,
    MAX_EXACT_UNITS,
    LatentTooLargeError,
    LogPartitionEstimate,
    ais_log_partition,
    enumerate_states,
    exact_distribution,
    exact_log_partition,
    other_side_fields,
    split_bipartite,
)

__all__ = [
    "AIS_FINAL_N_BETAS",
    "AIS_FINAL_N_CHAINS",
    "AIS_N_BETAS",
    "AIS_N_CHAINS",
    "LOG_Z_MIN_ESS",
    "LOG_Z_TOLERANCE",
    "MAX_EXACT_UNITS",
    "PRIOR_STRUCTURES",
    "BoltzmannPrior",
    "LatentTooLargeError",
    "LogPartitionEstimate",
    "ais_log_partition",
    "bipartite_energy",
    "bipartite_gibbs_sweep",
    "boltzmann_energy",
    "dense_gibbs_sweep",
    "enumerate_states",
    "exact_distribution",
    "exact_log_partition",
    "gibbs_sweep",
    "other_side_fields",
    "split_bipartite",
]
