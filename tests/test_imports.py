"""What `import scqbm` loads: a sampling host must not need scvi-tools."""

from __future__ import annotations

import subprocess
import sys

import pytest


def test_sampler_side_imports_without_scvi_tools():
    code = (
        "import sys, scqbm, scqbm.prior, scqbm.samplers, scqbm.samplers.service;"
        "heavy = [m for m in ('scvi', 'lightning', 'anndata', 'scanpy') if m in sys.modules];"
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_model_and_helpers_load_on_first_use():
    import scqbm
    from scqbm.model import QBMVAE

    assert scqbm.QBMVAE is QBMVAE
    assert callable(scqbm.tl.integrate) and callable(scqbm.datasets.kang_ifnb)
    assert {"QBMVAE", "datasets", "tl"} <= set(dir(scqbm))
    with pytest.raises(AttributeError, match="no attribute 'QBMVAe'"):
        scqbm.QBMVAe  # noqa: B018
