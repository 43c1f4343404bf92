"""Talking to QBoson's kaiwu SDK: import, credentials, licence and guarded optimizer calls.

The kaiwu SDK (closed source) ships only a CPython 3.10 wheel and asks for a licence on
standard input when it has none: that blocks a notebook and dies with EOF in a script. Every
call here therefore checks credentials first and runs the SDK with an empty standard input,
so a prompt fails at once with a clear message instead of waiting for a user who is not
there. The module needs only numpy and the standard library, so it can be checked in a
Python 3.10 environment that has kaiwu but not the rest of scqbm.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import os
import sys

import numpy as np

try:
    from ._errors import SamplerError, SamplerNotInstalled, SamplerUnavailable
except ImportError:  # loaded by file path on a bare kaiwu host, outside the package

    class SamplerError(RuntimeError):
        """A sampler failed (stand-alone copy of :class:`scqbm.samplers.SamplerError`)."""

    class SamplerUnavailable(SamplerError):
        """A backend cannot run here (stand-alone copy)."""

    class SamplerNotInstalled(SamplerUnavailable, ImportError):
        """A backend's optional package is not installed (stand-alone copy)."""


USER_ID_ENV = "SCQBM_KAIWU_USER_ID"
SDK_CODE_ENV = "SCQBM_KAIWU_SDK_CODE"

INSTALL_HINT = (
    "The kaiwu backends need QBoson's kaiwu SDK, which has a wheel for CPython 3.10 only: in "
    "a Python 3.10 environment run `pip install 'scqbm[kaiwu]'`, then serve it to other "
    "environments with `scqbm serve-sampler --backend kaiwu_sa` (or kaiwu_cim) and use the "
    "'remote' sampler there."
)


class KaiwuCredentialsError(SamplerUnavailable):
    """No kaiwu licence credentials, or the SDK refused them."""


class KaiwuError(SamplerError):
    """A kaiwu optimizer call failed or returned something unusable."""


def import_kaiwu():
    """Import the kaiwu SDK, or raise an ``ImportError`` with the install hint."""
    try:
        return importlib.import_module("kaiwu")
    except ImportError as err:
        python = ".".join(map(str, sys.version_info[:2]))
        raise SamplerNotInstalled(f"{INSTALL_HINT} This is Python {python}.") from err


def resolve_credentials(user_id: str | None, sdk_code: str | None) -> tuple[str, str]:
    """Credentials from the arguments, else the environment; raise clearly when missing."""
    user_id = user_id or os.environ.get(USER_ID_ENV)
    sdk_code = sdk_code or os.environ.get(SDK_CODE_ENV)
    missing = [name for name, value in (("user_id", user_id), ("sdk_code", sdk_code)) if not value]
    if missing:
        raise KaiwuCredentialsError(
            f"The kaiwu SDK needs a licence and no {' or '.join(missing)} was given: pass "
            f"`user_id` and `sdk_code` in sampler_kwargs or set {USER_ID_ENV} and "
            f"{SDK_CODE_ENV} (from platform.qboson.com). Not asking kaiwu, which would "
            "prompt on standard input."
        )
    return str(user_id), str(sdk_code)


@contextlib.contextmanager
def no_stdin():
    """Run SDK code with an empty standard input, so a licence prompt raises at once."""
    saved = sys.stdin
    sys.stdin = io.StringIO("")
    try:
        yield
    finally:
        sys.stdin = saved


def _explain(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}"
    if isinstance(err, EOFError) or "EOF when reading" in str(err):
        return (
            f"{text} (kaiwu asked for a licence on standard input: its licence is missing or "
            "invalid; check the credentials and that the licence server is reachable)"
        )
    return text


def init_license(kw, user_id: str, sdk_code: str) -> None:
    """``kw.license.init(user_id, sdk_code)`` with a clear error on failure."""
    try:
        with no_stdin():
            kw.license.init(user_id, sdk_code)
    except Exception as err:
        raise KaiwuCredentialsError(
            f"kaiwu could not set up its licence for user {user_id!r}: {_explain(err)}"
        ) from err


def run_optimizer(optimizer, ising_matrix: np.ndarray) -> np.ndarray:
    """``optimizer.solve(ising_matrix)`` as a ``(k, n_spins)`` array of +-1, errors explained."""
    try:
        with no_stdin():
            solutions = optimizer.solve(ising_matrix)
    except Exception as err:
        raise KaiwuError(
            f"kaiwu {type(optimizer).__name__}.solve failed: {_explain(err)}"
        ) from err
    if solutions is None:
        raise KaiwuError(
            f"kaiwu {type(optimizer).__name__}.solve returned no solutions (a CIM task that "
            "is not finished: use wait=True)."
        )
    solutions = np.atleast_2d(np.asarray(solutions))
    if solutions.shape[-1] != ising_matrix.shape[0]:
        raise KaiwuError(
            f"kaiwu returned solutions of shape {solutions.shape} for an Ising matrix of "
            f"{ising_matrix.shape[0]} spins."
        )
    return solutions
