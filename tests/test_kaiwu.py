"""The kaiwu backends up to the SDK call, with a stand-in ``kaiwu`` module.

The stand-in's simulated annealing draws exact Boltzmann samples of the Ising matrix it is
given (in a random gauge), so the adapter's conversion and gauge fixing are checked
statistically against the prior; its CIM returns the ground state of the (integer) matrix it
is given. The real SDK needs a licence and QBoson's cloud; ``test_real_kaiwu_fails_fast``
runs the adapter against the installed SDK in a Python 3.10 environment when
``SCQBM_KAIWU_PYTHON`` names its interpreter.
"""

from __future__ import annotations

import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from test_samplers_backends import check_against_exact, problem

from scqbm.prior import boltzmann_energy, enumerate_states
from scqbm.samplers import (
    KaiwuCredentialsError,
    binary_to_spins,
    boltzmann_to_ising,
    ising_energy,
    make_sampler,
    reduce_precision,
    spins_to_binary,
)
from scqbm.samplers._kaiwu_sdk import SDK_CODE_ENV, USER_ID_ENV

SAMPLERS_DIR = Path(__file__).resolve().parents[1] / "src" / "scqbm" / "samplers"


def all_spins(n_spins):
    return binary_to_spins(enumerate_states(n_spins - 1, dtype=torch.float64).numpy())


class FakeKaiwu(types.ModuleType):
    """Records every SDK call; optimizers sample or minimise the matrix they are given."""

    def __init__(self):
        super().__init__("kaiwu")
        self.calls: list[tuple] = []
        calls = self.calls

        def init(user_id, sdk_code):
            calls.append(("license.init", user_id, sdk_code))

        class SimulatedAnnealingOptimizer:
            def __init__(self, **kwargs):
                calls.append(("sa", kwargs))
                self.kwargs = kwargs

            def solve(self, matrix):
                calls.append(("sa.solve", np.array(matrix)))
                spins = all_spins(matrix.shape[0])
                weights = np.exp(-ising_energy(spins, matrix))
                rng = np.random.default_rng(self.kwargs["rand_seed"])
                picks = rng.choice(
                    len(spins), self.kwargs["size_limit"], p=weights / weights.sum()
                )
                gauge = rng.choice([-1.0, 1.0], size=(len(picks), 1))
                return (spins[picks] * gauge).astype(np.int8)

        class CIMOptimizer:
            def __init__(self, **kwargs):
                calls.append(("cim", kwargs))
                self.kwargs = kwargs

            def solve(self, matrix):
                calls.append(("cim.solve", np.array(matrix)))
                assert np.issubdtype(np.asarray(matrix).dtype, np.integer)
                spins = all_spins(matrix.shape[0])
                ground = spins[np.argmin(ising_energy(spins, matrix))]
                rows = np.tile(ground, (self.kwargs["sample_number"], 1))
                rows[::2] *= -1  # the machine returns either gauge
                return rows.astype(np.int8)

        self.license = types.SimpleNamespace(init=init)
        self.classical = types.SimpleNamespace(
            SimulatedAnnealingOptimizer=SimulatedAnnealingOptimizer
        )
        self.cim = types.SimpleNamespace(CIMOptimizer=CIMOptimizer)
        self.common = types.SimpleNamespace(CheckpointManager=types.SimpleNamespace(save_dir=None))

    def names(self):
        return [call[0] for call in self.calls]


@pytest.fixture
def kaiwu(monkeypatch):
    fake = FakeKaiwu()
    monkeypatch.setitem(sys.modules, "kaiwu", fake)
    monkeypatch.setenv(USER_ID_ENV, "user-from-env")
    monkeypatch.setenv(SDK_CODE_ENV, "code-from-env")
    return fake


@pytest.mark.parametrize("structure,n", [("bm", 8), ("rbm", 10)])
def test_kaiwu_sa_conversion_gives_the_prior_distribution(kaiwu, structure, n):
    h, W, n_visible = problem(structure, n)
    sampler = make_sampler("kaiwu_sa", n, seed=3, reads_per_solve=5000)
    result = sampler.sample(h, W, 20000, n_visible=n_visible)
    check_against_exact(result.samples[None], h, W)
    assert result.info["solves"] == 4 and result.info["ising_spins"] == n + 1
    # Full precision by default: the exact Ising matrix reaches the SDK.
    sent = [call[1] for call in kaiwu.calls if call[0] == "sa.solve"]
    assert np.allclose(sent[0], boltzmann_to_ising(h, W).J)
    sampler.sample(h, W, 10, n_visible=n_visible)
    # The licence is set up once per sampler, with the environment's credentials.
    assert kaiwu.calls[0] == ("license.init", "user-from-env", "code-from-env")
    assert kaiwu.names().count("license.init") == 1
    options = [call[1] for call in kaiwu.calls if call[0] == "sa"]
    assert [o["rand_seed"] for o in options[:4]] == [3, 4, 5, 6]
    # The next call continues the seed stream instead of replaying the first call's anneals.
    assert options[4]["rand_seed"] == 7
    assert options[0]["cutoff_temperature"] == 0.001 and options[-1]["size_limit"] == 10


def test_kaiwu_cim_sends_the_reduced_matrix_in_unique_sampling_tasks(kaiwu, tmp_path):
    h, W, _ = problem("bm", 9, seed=7, scale=1.0)
    sampler = make_sampler(
        "kaiwu_cim", 9, user_id="alice", sdk_code="s3cret", checkpoint_dir=str(tmp_path)
    )
    result = sampler.sample(h, W, 2500)
    expected, scale = reduce_precision(boltzmann_to_ising(h, W).J, 8)
    sent = [call[1] for call in kaiwu.calls if call[0] == "cim.solve"]
    assert len(sent) == 2 and all(np.array_equal(m, expected) for m in sent)
    assert np.abs(expected).max() == 127 and result.info["precision_scale"] == scale
    tasks = [call[1] for call in kaiwu.calls if call[0] == "cim"]
    assert [t["sample_number"] for t in tasks] == [2000, 500]
    assert all(t["wait"] and t["task_mode"] == "sampling" for t in tasks)
    names = [t["task_name"] for t in tasks]
    assert len(set(names)) == 2 and all(name.startswith("scqbm-") for name in names)
    assert kaiwu.common.CheckpointManager.save_dir == str(tmp_path)
    assert kaiwu.calls[0] == ("license.init", "alice", "s3cret")
    # Gauge fixing maps both returned gauges to the prior's ground state, which 8 bits keep.
    states = enumerate_states(9)
    ground = states[boltzmann_energy(states, h, W).argmin()]
    assert torch.equal(result.samples, ground.expand(2500, -1))
    assert sampler.sample(h, W, 3).samples.shape == (3, 9)
    assert kaiwu.calls[-2][1]["sample_number"] == 10  # the sampling mode's minimum


def test_missing_credentials_fail_before_any_sdk_call(kaiwu, monkeypatch):
    monkeypatch.delenv(USER_ID_ENV)
    h, W, _ = problem("bm", 6)
    for name in ("kaiwu_sa", "kaiwu_cim"):
        with pytest.raises(KaiwuCredentialsError, match=f"{USER_ID_ENV}.*Not asking kaiwu"):
            make_sampler(name, 6).sample(h, W, 4)
        with pytest.raises(KaiwuCredentialsError, match="no user_id was given"):
            make_sampler(name, 6).preflight()
    assert kaiwu.calls == []


def test_capacity_is_checked_before_the_licence(kaiwu):
    h, W, _ = problem("rbm", 550)
    with pytest.raises(ValueError, match=r"needs 551 spins .* has 550"):
        make_sampler("kaiwu_cim", 550).sample(h, W, 10, n_visible=275)
    assert kaiwu.calls == []


def test_a_licence_prompt_fails_at_once(kaiwu, monkeypatch):
    def prompt(self, matrix):
        return input("Please enter user ID: ")

    monkeypatch.setattr(kaiwu.classical.SimulatedAnnealingOptimizer, "solve", prompt)
    # A user id waiting on stdin: without the adapter's guard kaiwu would read it.
    read_end, write_end = os.pipe()
    os.write(write_end, b"12345\n")
    monkeypatch.setattr(sys, "stdin", os.fdopen(read_end))
    h, W, _ = problem("bm", 5)
    with pytest.raises(RuntimeError, match="asked for a licence on standard input"):
        make_sampler("kaiwu_sa", 5).sample(h, W, 4)
    assert sys.stdin.readline() == "12345\n"  # untouched, and restored afterwards
    os.close(write_end)


def test_missing_kaiwu_gives_the_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "kaiwu", None)
    h, W, _ = problem("bm", 4)
    sampler = make_sampler("kaiwu_sa", 4, user_id="u", sdk_code="c")  # construction is free
    with pytest.raises(ImportError, match=r"CPython 3\.10 only.*serve-sampler"):
        sampler.sample(h, W, 2)


def test_gauge_fixing_inverts_the_conversion():
    z = enumerate_states(5, dtype=torch.float64).numpy()
    spins = binary_to_spins(z)
    assert np.array_equal(spins_to_binary(np.concatenate([spins, -spins])), np.concatenate([z, z]))


REAL_KAIWU_CHECK = r"""
import importlib.util, os, sys, time
import numpy as np

def load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(sys.argv[1], name + ".py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module

ising, sdk = load("_ising"), load("_kaiwu_sdk")
kw = sdk.import_kaiwu()  # the real SDK
print("imported", kw.__name__, "from", os.path.dirname(kw.__file__))
os.environ.pop(sdk.USER_ID_ENV, None); os.environ.pop(sdk.SDK_CODE_ENV, None)
try:
    sdk.resolve_credentials(None, None)
except sdk.KaiwuCredentialsError as err:
    print("no credentials:", err)
else:
    raise SystemExit("credentials were not required")
rng = np.random.default_rng(0)
W = np.triu(rng.normal(size=(6, 6)), 1); W = W + W.T
J, _ = ising.reduce_precision(ising.boltzmann_to_ising(rng.normal(size=6), W).J)
start = time.monotonic()
optimizer = kw.classical.SimulatedAnnealingOptimizer(size_limit=4)
try:
    sdk.run_optimizer(optimizer, J)  # no licence: kaiwu would prompt on stdin
except RuntimeError as err:
    print("unlicensed solve:", err)
else:
    raise SystemExit("kaiwu solved without a licence")
try:
    sdk.init_license(kw, "0", "invalid")
except sdk.KaiwuCredentialsError as err:
    print("bad credentials:", err)
print(f"seconds {time.monotonic() - start:.1f}")
"""


def test_real_kaiwu_fails_fast_without_a_licence(tmp_path):
    python = os.environ.get("SCQBM_KAIWU_PYTHON")
    if not python:
        pytest.skip("set SCQBM_KAIWU_PYTHON to a Python 3.10 interpreter with kaiwu installed")
    env = {k: v for k, v in os.environ.items() if k not in (USER_ID_ENV, SDK_CODE_ENV)}
    # stdin is a pipe nobody writes to: without the adapter's guard kaiwu's prompt would hang.
    process = subprocess.Popen(
        [python, "-c", REAL_KAIWU_CHECK, str(SAMPLERS_DIR)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**env, "HOME": str(tmp_path)},
    )
    try:
        output, _ = process.communicate(timeout=120)
    finally:
        process.kill()
    print(output)
    assert process.returncode == 0, output
    assert "no credentials:" in output and "asked for a licence on standard input" in output
