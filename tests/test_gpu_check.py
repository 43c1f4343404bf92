"""The prepared GPU script's logic, run on a CPU at tiny sizes."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def test_gpu_check_runs_on_cpu_tiny(tmp_path):
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    result = gpu_check.main(["--device", "cpu", "--tiny", "--out", str(tmp_path)])
    assert json.loads((tmp_path / "gpu_check.json").read_text()) == result
    # Dense (default and wide blocks) and RBM sweeps for 2 sizes x 2 chain counts.
    assert len(result["sweeps"]) == 2 * 2 * 2 + 2 * 2
    assert all(row["spin_updates_per_s"] > 0 for row in result["sweeps"])
    assert result["dense_target_met"] is False  # 1e10 is not a CPU figure
    assert set(result["epoch_seconds"]) == {"scvi", "qbmvae"} and result["epoch_ratio"] > 0
    assert result["skipped"] == ["ddp (needs more than one GPU)"]
