"""Registry of sampler backends.

Backends are chosen by name so that ``QBMVAE(sampler="name", sampler_kwargs={...})`` stays a
plain, picklable constructor argument.
"""

from __future__ import annotations

from collections.abc import Callable

from ._base import BoltzmannSampler
from ._calibration import CalibratedSampler
from ._dimod import DimodSampler
from ._gibbs import GibbsSampler
from ._kaiwu import KaiwuCIMSampler, KaiwuSASampler
from ._remote import RemoteSampler
from ._tempering import ParallelTemperingSampler

# name -> factory(n_units, **kwargs)
_SAMPLERS: dict[str, Callable[..., BoltzmannSampler]] = {}


def register_sampler(name: str, factory: Callable[..., BoltzmannSampler]) -> None:
    """Register ``factory(n_units, **kwargs) -> BoltzmannSampler`` under ``name``."""
    _SAMPLERS[name] = factory


def available_samplers() -> list[str]:
    """Names accepted by ``QBMVAE(sampler=...)``."""
    return sorted(_SAMPLERS)


def make_sampler(name: str, n_units: int, **kwargs) -> BoltzmannSampler:
    """Instantiate the backend registered under ``name`` for a prior of ``n_units`` units."""
    try:
        factory = _SAMPLERS[name]
    except KeyError:
        raise ValueError(f"Unknown sampler {name!r}; available: {available_samplers()}.") from None
    try:
        return factory(n_units, **kwargs)
    except TypeError as err:
        raise TypeError(f"Invalid `sampler_kwargs` for sampler {name!r}: {err}") from err


register_sampler(GibbsSampler.name, GibbsSampler)
register_sampler(ParallelTemperingSampler.name, ParallelTemperingSampler)
register_sampler(DimodSampler.name, DimodSampler)
register_sampler(CalibratedSampler.name, CalibratedSampler)
register_sampler(KaiwuSASampler.name, KaiwuSASampler)
register_sampler(KaiwuCIMSampler.name, KaiwuCIMSampler)
register_sampler(RemoteSampler.name, RemoteSampler)
