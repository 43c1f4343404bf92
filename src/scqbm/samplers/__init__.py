"""Samplers of Boltzmann distributions: one interface, pluggable backends."""

from ._base import (
    DEFAULT_NUM_READS,
    BoltzmannSampler,
    PersistentChainSampler,
    SamplerError,
    SamplerUnavailable,
    SampleSet,
    validate_problem,
)
from ._calibration import CalibratedSampler, estimate_effective_beta
from ._compare import compare
from ._dimod import DimodSampler, to_bqm
from ._errors import SamplerNotInstalled
from ._gibbs import GibbsSampler
from ._ising import (
    IsingProblem,
    binary_to_spins,
    boltzmann_to_ising,
    ising_energy,
    reduce_precision,
    spins_to_binary,
)
from ._kaiwu import KaiwuCIMSampler, KaiwuSASampler
from ._kaiwu_sdk import KaiwuCredentialsError, KaiwuError
from ._registry import available_samplers, make_sampler, register_sampler
from ._remote import RemoteSampler, ServiceConfigurationError, ServiceUnavailable
from ._tempering import ParallelTemperingSampler

__all__ = [
    "DEFAULT_NUM_READS",
    "BoltzmannSampler",
    "CalibratedSampler",
    "DimodSampler",
    "GibbsSampler",
    "IsingProblem",
    "KaiwuCIMSampler",
    "KaiwuCredentialsError",
    "KaiwuError",
    "KaiwuSASampler",
    "ParallelTemperingSampler",
    "PersistentChainSampler",
    "RemoteSampler",
    "SampleSet",
    "SamplerError",
    "SamplerNotInstalled",
    "SamplerUnavailable",
    "ServiceConfigurationError",
    "ServiceUnavailable",
    "available_samplers",
    "binary_to_spins",
    "boltzmann_to_ising",
    "compare",
    "estimate_effective_beta",
    "ising_energy",
    "make_sampler",
    "reduce_precision",
    "register_sampler",
    "spins_to_binary",
    "to_bqm",
    "validate_problem",
]
