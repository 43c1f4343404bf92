"""Neural-network pieces: the Bernoulli encoder and the relaxations of the binary bottleneck."""

from ._encoder import BernoulliEncoder
from ._relaxations import (
    RELAXATIONS,
    OverlappingExponential,
    SpikeAndExponential,
    bernoulli_entropy,
    make_relaxation,
)

__all__ = [
    "RELAXATIONS",
    "BernoulliEncoder",
    "OverlappingExponential",
    "SpikeAndExponential",
    "bernoulli_entropy",
    "make_relaxation",
]
