"""Samplers of Boltzmann distributions: one interface, pluggable backends."""

from ._base import BoltzmannSampler, SampleSet, SamplerError, validate_problem
from ._gibbs import GibbsSampler
from ._registry import available_samplers, make_sampler, register_sampler

__all__ = [
    "BoltzmannSampler",
    "GibbsSampler",
    "SampleSet",
    "SamplerError",
    "available_samplers",
    "make_sampler",
    "register_sampler",
    "validate_problem",
]
