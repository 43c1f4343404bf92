from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
KANG_FILE = SHARED_DATA / "kang_ifnb_pbmc.h5ad"

os.environ.setdefault("SCQBM_DATA_DIR", str(SHARED_DATA))
# The test models are tiny: one thread avoids intra-op threading overhead that made small
# tensor ops 10-70x slower on a loaded 2-core machine.
torch.set_num_threads(1)


def random_problem(n: int, structure: str = "bm", scale: float = 0.5, seed: int = 0):
    """Random fields and couplings of a prior of ``n`` units (via BoltzmannPrior)."""
    from scqbm.prior import BoltzmannPrior

    torch.manual_seed(seed)
    prior = BoltzmannPrior(n, structure=structure, init_scale=scale)
    with torch.no_grad():
        prior.h.normal_(0.0, scale)
    return prior


@pytest.fixture
def kang_path():
    if not KANG_FILE.exists():
        pytest.skip(f"real data not available at {KANG_FILE}")
    return KANG_FILE
