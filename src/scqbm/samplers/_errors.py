"""The sampler error hierarchy (standard library only, so a bare kaiwu host can load it)."""

from __future__ import annotations


class SamplerError(RuntimeError):
    """A sampler failed; the message names the sampler and, during training, the step."""


class SamplerUnavailable(SamplerError):
    """A backend cannot run here (missing package, no licence or credentials, no service)."""


class SamplerNotInstalled(SamplerUnavailable, ImportError):
    """A backend's optional package is not installed (also an ``ImportError``)."""
