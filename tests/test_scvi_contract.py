"""Contract tests: the private scvi-tools names in ``scqbm._compat`` still mean what we assume.

Each test pins one assumption about scvi-tools internals that scqbm builds on. A new
scvi-tools release that moves, renames or changes one of them fails here, by name, instead
of somewhere inside training or loading.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import numpy as np
import pytest
import scvi
import torch
from scvi.data import synthetic_iid
from scvi.module import VAE
from scvi.nn import FCLayers
from scvi.train import SemiSupervisedTrainingPlan, TrainingPlan

from scqbm import QBMVAE, _compat
from scqbm.model import QBMSCANVI

SRC = Path(__file__).resolve().parents[1] / "src" / "scqbm"


def _params(func) -> list[str]:
    return list(inspect.signature(func).parameters)


def test_compat_is_the_only_importer_of_private_scvi_modules():
    # `from scvi.x._y import` / `import scvi.x._y` outside _compat defeats the contract.
    private = re.compile(r"^\s*(from|import)\s+scvi(\.\w+)*\._\w+", re.MULTILINE)
    offenders = [
        str(path.relative_to(SRC))
        for path in SRC.rglob("*.py")
        if path.name != "_compat.py" and private.search(path.read_text())
    ]
    assert offenders == []


def test_module_keys_used_by_scqbm_exist():
    used = set()
    for path in SRC.rglob("*.py"):
        used |= set(re.findall(r"MODULE_KEYS\.([A-Z_]+)", path.read_text()))
    assert used, "no MODULE_KEYS use found: the scan is broken"
    missing = sorted(key for key in used if not hasattr(_compat.MODULE_KEYS, key))
    assert missing == []


def test_setup_constants_and_minify_types():
    for key in (_compat.SCVI_UUID_KEY, _compat.MANAGER_UUID_KEY):
        assert key.startswith(_compat.SCVI_KEY_PREFIX)
    assert _compat.ADATA_MINIFY_TYPE_UNS_KEY.startswith(_compat.SCVI_KEY_PREFIX)
    assert _compat.SETUP_ARGS_KEY == "setup_args"
    assert {"latent_posterior_parameters", "latent_posterior_parameters_with_counts"} <= set(
        _compat.ADATA_MINIFY_TYPE
    )

    adata = synthetic_iid(batch_size=20, n_genes=10)
    QBMVAE.setup_anndata(adata)
    assert _compat.SCVI_UUID_KEY in adata.uns and _compat.MANAGER_UUID_KEY in adata.uns
    assert _compat.get_adata_minify_type(adata) is None
    model = QBMVAE(adata, n_latent=4)
    assert set(model.registry[_compat.SETUP_ARGS_KEY]) >= {"batch_key", "layer"}


def test_saved_file_reader_signature_and_call_sites():
    # _integrity.scvi_loads_from wraps it positionally and swaps it in these modules.
    assert _params(_compat.load_saved_files)[:5] == [
        "dir_path",
        "load_adata",
        "prefix",
        "map_location",
        "backup_url",
    ]
    for module in _compat.SAVED_FILE_READERS:
        assert module._load_saved_files is _compat.load_saved_files, module.__name__


def test_batch_code_lookup(tmp_path):
    adata = synthetic_iid(batch_size=20, n_genes=10, n_batches=2)
    QBMVAE.setup_anndata(adata, batch_key="batch")
    model = QBMVAE(adata, n_latent=4)
    codes = _compat.get_batch_code_from_category(model.adata_manager, ["batch_1", "batch_0"])
    assert list(np.asarray(codes).ravel()) == [1, 0]


def test_max_epochs_heuristic():
    assert _params(_compat.get_max_epochs_heuristic)[0] == "n_obs"
    assert _compat.get_max_epochs_heuristic(10_000) == 400
    assert _compat.get_max_epochs_heuristic(100_000) < 400


def test_vae_encoder_layout_and_init_arguments():
    vae = VAE(n_input=10, n_batch=2, n_latent=4)
    assert isinstance(_compat.vae_encoder_trunk(vae), FCLayers)
    accepted = set(_params(VAE.__init__))
    # What QBMVAE passes on to VAE (model/_qbmvae.py) and the module's own base calls.
    needed = {
        "n_input",
        "n_batch",
        "n_labels",
        "n_hidden",
        "n_latent",
        "n_layers",
        "n_continuous_cov",
        "n_cats_per_cov",
        "dropout_rate",
        "dispersion",
        "log_variational",
        "gene_likelihood",
        "latent_distribution",
        "encode_covariates",
        "deeply_inject_covariates",
        "use_batch_norm",
        "use_layer_norm",
        "use_size_factor_key",
        "use_observed_lib_size",
        "library_log_means",
        "library_log_vars",
        "extra_payload_autotune",
    }
    assert needed - accepted == set()
    assert hasattr(vae, "extra_payload_autotune")


def test_vae_methods_scqbm_overrides_or_calls():
    assert _params(VAE.generative)[:4] == ["self", "z", "library", "batch_index"]
    assert {"cont_covs", "cat_covs", "size_factor", "y", "transform_batch"} <= set(
        _params(VAE.generative)
    )
    assert _params(VAE.loss)[:5] == [
        "self",
        "tensors",
        "inference_outputs",
        "generative_outputs",
        "kl_weight",
    ]
    assert {"qzm", "qzv", "observed_lib_size", "n_samples"} <= set(_params(VAE._cached_inference))
    for name in ("_get_inference_input", "_get_generative_input", "_compute_local_library_params"):
        assert callable(getattr(VAE, name)), name


@pytest.mark.parametrize(
    ("owner", "name"),
    [
        ("BaseModelClass", "_validate_anndata"),
        ("BaseModelClass", "_get_init_params"),
        ("BaseModelClass", "_check_if_trained"),
        ("BaseModelClass", "_make_data_loader"),
        ("BaseModelClass", "_get_setup_method_args"),
        ("BaseModelClass", "_OBSERVED_LIB_SIZE_KEY"),
        ("BaseModelClass", "_setup_adata_manager_store"),
        ("BaseMinifiedModeModelClass", "_update_adata_and_manager_post_minification"),
        ("BaseMinifiedModeModelClass", "_get_fields_for_adata_minification"),
        ("SemisupervisedTrainingMixin", "_set_indices_and_labels"),
    ],
)
def test_base_model_members(owner, name):
    assert hasattr(getattr(scvi.model.base, owner), name)


@pytest.mark.parametrize("optimizer", ["Adam", "AdamW", "Custom"])
def test_prior_group_built_through_scvi_optimizer_creator(optimizer):
    adata = synthetic_iid(batch_size=30, n_genes=10)
    QBMVAE.setup_anndata(adata)
    model = QBMVAE(adata, n_latent=6)
    kwargs = {"lr": 2e-3, "weight_decay": 1e-5, "optimizer": optimizer}
    if optimizer == "Custom":
        kwargs["optimizer_creator"] = lambda params: torch.optim.SGD(params, lr=0.5)
    plan = model._training_plan_cls(model.module, lr_prior=7e-3, weight_decay_prior=3e-4, **kwargs)
    assert isinstance(plan, TrainingPlan)
    opt = plan.configure_optimizers()["optimizer"]
    expected = {"Adam": torch.optim.Adam, "AdamW": torch.optim.AdamW, "Custom": torch.optim.SGD}
    assert type(opt) is expected[optimizer]
    network, prior = opt.param_groups
    prior_ids = {id(p) for p in model.module.prior.parameters()}
    assert {id(p) for p in prior["params"]} == prior_ids
    assert not prior_ids & {id(p) for p in network["params"]}
    n_trainable = sum(1 for p in model.module.parameters() if p.requires_grad)
    assert len(network["params"]) + len(prior["params"]) == n_trainable
    assert (prior["lr"], prior["weight_decay"]) == (7e-3, 3e-4)
    if optimizer != "Custom":
        assert (network["lr"], network["weight_decay"]) == (2e-3, 1e-5)
    else:
        assert network["lr"] == 0.5


def test_semisupervised_plan_uses_the_same_creator():
    assert "get_optimizer_creator" not in SemiSupervisedTrainingPlan.__dict__
    from scqbm.train import QBMSemiSupervisedTrainingPlan, QBMTrainingPlan

    assert (
        QBMSemiSupervisedTrainingPlan.get_optimizer_creator
        is QBMTrainingPlan.get_optimizer_creator
    )
    assert QBMSCANVI._training_plan_cls is QBMSemiSupervisedTrainingPlan


def test_version_range_declared_matches_installed():
    import tomllib

    pyproject = tomllib.loads((SRC.parents[1] / "pyproject.toml").read_text())
    (spec,) = [r for r in pyproject["project"]["dependencies"] if r.startswith("scvi-tools")]
    assert ">=1.4" in spec and "<1.6" in spec
    major, minor = (int(x) for x in _compat.SCVI_VERSION.split(".")[:2])
    assert (1, 4) <= (major, minor) < (1, 6)


def test_module_signature_names_vae_arguments():
    # scvi-tools 1.4 rebuilds a data-module model's module from these names on `load`.
    from scqbm.module import QBMVAEModule

    names = set(inspect.signature(QBMVAEModule).parameters)
    assert {"n_input", "n_latent", "prior", "n_batch", "n_hidden", "n_layers"} <= names
    assert "self" not in names
