"""Registry of sampler backends.

Backends are chosen by name so that ``QBMVAE(sampler="name", sampler_kwargs={...})`` stays a
plain, picklable constructor argument.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

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


def accepted_kwargs(factory: Callable[..., BoltzmannSampler]) -> list[str] | None:
    """Keyword names ``factory(n_units, **kwargs)`` accepts, or ``None`` if it takes any."""
    parameters = list(inspect.signature(factory).parameters.values())[1:]
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return None
    return [
        p.name
        for p in parameters
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    ]


def make_sampler(name: str, n_units: int, **kwargs) -> BoltzmannSampler:
    """Instantiate the backend registered under ``name`` for a prior of ``n_units`` units.

    Unknown keyword arguments are rejected with a ``TypeError`` naming the accepted ones
    (backends that pass keywords through, like ``dimod``, check them on first use).
    """
    try:
        factory = _SAMPLERS[name]
    except KeyError:
        raise ValueError(f"Unknown sampler {name!r}; available: {available_samplers()}.") from None
    accepted = accepted_kwargs(factory)
    if accepted is not None:
        unknown = sorted(set(kwargs) - set(accepted))
        if unknown:
            raise TypeError(
                f"Invalid `sampler_kwargs` for sampler {name!r}: {unknown} not accepted; "
                f"accepted: {sorted(accepted)}."
            )
    try:
        return factory(n_units, **kwargs)
    except TypeError as err:
        raise TypeError(f"Invalid `sampler_kwargs` for sampler {name!r}: {err}") from err


def make_calibrated_sampler(
    n_units: int,
    backend: str | BoltzmannSampler = "dimod",
    backend_kwargs: dict[str, Any] | None = None,
    **calibration_kwargs,
) -> CalibratedSampler:
    """The ``"calibrated"`` backend by name.

    Builds the child ``backend`` (registered name, or an instance) with ``backend_kwargs``,
    then wraps it (other keywords: those of :class:`CalibratedSampler`).
    """
    reject_unknown_calibration = set(calibration_kwargs) - set(
        accepted_kwargs(CalibratedSampler) or []
    )
    if reject_unknown_calibration:
        raise TypeError(
            f"CalibratedSampler does not accept {sorted(reject_unknown_calibration)}; accepted: "
            f"{sorted(['backend', 'backend_kwargs', *accepted_kwargs(CalibratedSampler)])}."
        )
    if isinstance(backend, str):
        if backend == CalibratedSampler.name:
            raise ValueError("A calibrated sampler cannot wrap another calibrated sampler.")
        backend = make_sampler(backend, n_units, **(backend_kwargs or {}))
    elif backend_kwargs:
        raise TypeError("`backend_kwargs` applies to a backend given by name, not an instance.")
    return CalibratedSampler(backend, **calibration_kwargs)


register_sampler(GibbsSampler.name, GibbsSampler)
register_sampler(ParallelTemperingSampler.name, ParallelTemperingSampler)
register_sampler(DimodSampler.name, DimodSampler)
register_sampler(CalibratedSampler.name, make_calibrated_sampler)
register_sampler(KaiwuSASampler.name, KaiwuSASampler)
register_sampler(KaiwuCIMSampler.name, KaiwuCIMSampler)
register_sampler(RemoteSampler.name, RemoteSampler)
