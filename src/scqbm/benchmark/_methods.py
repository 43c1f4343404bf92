"""Methods of the suite: each maps a prepared dataset to an embedding (plus model outputs)."""

from __future__ import annotations

import ast
import inspect
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.util import find_spec

import numpy as np
import pandas as pd
import torch
from anndata import AnnData

__all__ = [
    "METHODS",
    "Method",
    "MethodOutput",
    "gaussian_ablation_kwargs",
    "per_cell_elbo_terms",
    "resolve_method",
]

logger = logging.getLogger(__name__)


@dataclass
class MethodOutput:
    """What a fitted method hands to the tasks.

    Attributes
    ----------
    embedding
        ``(n_cells, d)`` array.
    seconds
        Wall time of the fit (training plus embedding).
    extras
        Per-cell arrays from models: ``energy`` (QBMVAE prior energy), ``reconstruction_ll``
        (``log p(x | z)`` of one posterior sample), ``kl_z`` and ``elbo``.
    info
        Scalars to record (for example the final ``log Z``, epochs actually run, training
        throughput ``cells_per_second``).
    history
        Per-epoch training history of neural methods (ELBO, KL, reconstruction, log Z, ...).

    """

    embedding: np.ndarray
    seconds: float
    extras: dict[str, np.ndarray] = field(default_factory=dict)
    info: dict[str, float] = field(default_factory=dict)
    history: pd.DataFrame | None = None


@dataclass(frozen=True)
class Method:
    """A method of the suite.

    Attributes
    ----------
    name
        Registry name (also the cache folder and the label in tables).
    description
        One line for the report.
    fit
        ``fit(adata, batch_key, seed, training, **model_kwargs) -> MethodOutput`` with a
        :class:`~scqbm.benchmark.Training` (regime, epochs, run folder).
    stochastic
        ``False`` for methods whose embedding does not depend on the seed (run once).
    needs_batch
        Integration methods that cannot run without a batch key.
    requires
        Importable module the method needs (the method is skipped with a reason without it).
    accepts_kwargs
        Whether variants ``name(key=value, ...)`` may pass model arguments (see
        :func:`resolve_method`).
    trained
        Neural methods, trained under the suite's training regime (cached per regime).
    requires_prior
        A ``prior`` option of :class:`scqbm.QBMVAE` the method needs (skipped without it).

    """

    name: str
    description: str
    fit: Callable[..., MethodOutput]
    stochastic: bool = True
    needs_batch: bool = False
    requires: str | None = None
    accepts_kwargs: bool = False
    trained: bool = False
    requires_prior: str | None = None

    def unavailable_reason(self, batch_key: str | None) -> str | None:
        """Why the method cannot run here, or ``None``."""
        if self.requires_prior is not None and not _qbmvae_has_prior(self.requires_prior):
            return f"this scqbm's QBMVAE has no prior={self.requires_prior!r}"
        if self.requires is not None and find_spec(self.requires) is None:
            return f"{self.requires} is not installed (pip install 'scqbm[benchmark]' installs it)"
        if self.needs_batch and batch_key is None:
            return "the dataset has no batch key"
        return None


# ---------------------------------------------------------------------- helpers
def _qbmvae_has_prior(prior: str) -> bool:
    from typing import get_args

    from scqbm import QBMVAE

    annotation = inspect.signature(QBMVAE.__init__, eval_str=True).parameters["prior"].annotation
    if prior in get_args(annotation):
        return True
    from scqbm.prior import BoltzmannPrior

    try:  # the annotation may lag behind the prior's accepted structures
        BoltzmannPrior(2, structure=prior)
    except (ValueError, TypeError):
        return False
    return True


def _seed_everything(seed: int) -> None:
    import scvi

    scvi.settings.seed = seed  # lightning's seed_everything: random, numpy and torch


def _model_adata(adata: AnnData) -> AnnData:
    """A light copy with the counts only (what the models are set up on)."""
    return AnnData(X=adata.layers["counts"].copy(), obs=adata.obs.copy(), var=adata.var.copy())


@torch.inference_mode()
def per_cell_elbo_terms(model, adata: AnnData, batch_size: int = 1024) -> dict[str, np.ndarray]:
    """Per-cell ``log p(x | z)``, ``KL(q(z|x) || p(z))`` and ELBO of a trained scvi-style model.

    One posterior sample per cell (``torch`` seeded by the caller); the KL of QBMVAE uses the
    stored estimate of ``log Z`` (exact or AIS), so its ELBO is a real bound.

    Parameters
    ----------
    model
        A trained :class:`scqbm.QBMVAE` or :class:`scvi.model.SCVI`.
    adata
        The AnnData it was set up on.
    batch_size
        Cells per forward pass.

    Returns
    -------
    Dict with ``reconstruction_ll``, ``kl_z`` and ``elbo`` arrays of shape ``(n_cells,)``.

    """
    from scqbm._compat import MODULE_KEYS

    model.module.eval()
    rec, kl_z, kl_l = [], [], []
    for tensors in model._make_data_loader(adata=adata, batch_size=batch_size):
        _, _, losses = model.module(tensors, loss_kwargs={"kl_weight": 1.0})
        rec.append(losses.reconstruction_loss["reconstruction_loss"].cpu())
        kl_z.append(losses.kl_local[MODULE_KEYS.KL_Z_KEY].cpu())
        kl_l.append(losses.kl_local[MODULE_KEYS.KL_L_KEY].cpu())
    rec_ll = -torch.cat(rec).numpy()
    kl = torch.cat(kl_z).numpy()
    kl_lib = torch.cat(kl_l).numpy()
    return {"reconstruction_ll": rec_ll, "kl_z": kl, "elbo": rec_ll - kl - kl_lib}


def _train_scvi_like(cls, adata, batch_key, seed, training, model_kwargs, extra=None):
    import warnings

    from scqbm._compat import get_max_epochs_heuristic

    from ._training import clear_run_state, make_callback, resume_checkpoint, train_kwargs_of

    model_kwargs = dict(model_kwargs)
    plan_kwargs = model_kwargs.pop("plan_kwargs", None)
    variant_train_kwargs = model_kwargs.pop("train_kwargs", None)
    _seed_everything(seed)
    work = _model_adata(adata)
    cls.setup_anndata(work, batch_key=batch_key)
    start = time.perf_counter()
    model = cls(work, **model_kwargs)
    kwargs = train_kwargs_of(training, plan_kwargs, variant_train_kwargs)
    max_epochs = kwargs.get("max_epochs") or get_max_epochs_heuristic(work.n_obs)
    callback = None
    if training.run_dir is not None:
        callback = make_callback(training, max_epochs)
        kwargs["callbacks"] = [callback]
        ckpt = resume_checkpoint(training)
        if ckpt is not None:
            logger.info("%s: resuming from %s", training.label, ckpt)
            kwargs["ckpt_path"] = ckpt
    with warnings.catch_warnings():
        # Lightning's per-fit notices (logging interval, dataloader workers) are noise here.
        warnings.filterwarnings("ignore", module="lightning")
        model.train(**kwargs)
    train_seconds = callback.seconds() if callback is not None else time.perf_counter() - start
    embedding = np.asarray(model.get_latent_representation(), dtype=np.float32)
    seconds = time.perf_counter() - start + (callback.seconds_before if callback else 0.0)
    torch.manual_seed(seed)
    extras = per_cell_elbo_terms(model, work)
    history = callback.history(model.trainer) if callback is not None else None
    if history is None or history.empty:
        history = _history(model)
    n_epochs = int(history.index.max()) + 1 if len(history) else 0
    train_indices = getattr(model, "train_indices", None)
    n_train = len(train_indices) if train_indices is not None else work.n_obs
    info = {
        "epochs": float(n_epochs),
        "max_epochs": float(max_epochs),
        "train_seconds": float(train_seconds),
        # Only meaningful for uninterrupted runs (a resumed run adds its earlier seconds).
        "cells_per_second": float(n_train * n_epochs / max(train_seconds, 1e-9)),
    }
    if callback is not None and callback.first_epoch:
        info["resumed_at_epoch"] = float(callback.first_epoch)
    if extra is not None:
        more_extras, more_info = extra(model)
        extras.update(more_extras)
        info.update(more_info)
    if training.run_dir is not None:
        # The model is kept for tasks that need it (differential expression).
        model.save(str(training.run_dir / "model"), overwrite=True, save_anndata=False)
        (training.run_dir / "model" / "model_class.txt").write_text(
            f"{cls.__module__}.{cls.__name__}"
        )
        clear_run_state(training)
    return MethodOutput(embedding, seconds, extras, info, history)


def _history(model) -> pd.DataFrame:
    from ._training import _history_frame

    return _history_frame(model.history or {})


# ---------------------------------------------------------------------- methods
def _fit_pca(adata, batch_key, seed, training) -> MethodOutput:
    start = time.perf_counter()
    embedding = np.asarray(adata.obsm["X_pca"], dtype=np.float32)
    return MethodOutput(embedding, time.perf_counter() - start)


def _fit_scvi(adata, batch_key, seed, training, **model_kwargs) -> MethodOutput:
    import scvi

    return _train_scvi_like(scvi.model.SCVI, adata, batch_key, seed, training, model_kwargs)


def _fit_scvi_default(adata, batch_key, seed, training, **model_kwargs) -> MethodOutput:
    import dataclasses

    import scvi

    # scVI's own defaults whatever the suite's regime (its heuristic, up to 400 epochs).
    training = dataclasses.replace(training, regime="default")
    return _train_scvi_like(scvi.model.SCVI, adata, batch_key, seed, training, model_kwargs)


def _fit_scvi_30x2(adata, batch_key, seed, training, **model_kwargs) -> MethodOutput:
    import scvi

    kwargs = {"n_latent": 30, "n_layers": 2, **model_kwargs}
    return _train_scvi_like(scvi.model.SCVI, adata, batch_key, seed, training, kwargs)


def gaussian_ablation_kwargs() -> dict:
    """SCVI arguments that reproduce QBMVAE's default encoder trunk and decoder.

    QBMVAE's module is scvi's :class:`~scvi.module.VAE` with the Gaussian head of the encoder
    (two ``Linear(n_hidden, n_latent)`` for mean and variance) replaced by one
    ``Linear(n_hidden, n_latent)`` for Bernoulli logits; the ``FCLayers`` trunk and
    ``DecoderSCVI`` are built by the same ``VAE.__init__`` from the same arguments. So
    :class:`scvi.model.SCVI` with QBMVAE's defaults of ``n_hidden``, ``n_latent``,
    ``n_layers``, ``dropout_rate``, ``dispersion``, ``gene_likelihood`` and
    ``use_observed_lib_size`` has the identical trunk and decoder (same layer sizes, same
    batch conditioning), and differs only in the latent: ``N(0, I)`` prior, Gaussian posterior,
    decoder fed ``z`` in R^n instead of the relaxed binary ``zeta`` in [0, 1]^n. The values are
    read from :class:`scqbm.QBMVAE`'s signature, so the ablation follows its defaults.
    """
    from scqbm import QBMVAE

    params = inspect.signature(QBMVAE.__init__).parameters
    keys = (
        "n_hidden",
        "n_latent",
        "n_layers",
        "dropout_rate",
        "dispersion",
        "gene_likelihood",
        "use_observed_lib_size",
    )
    return {k: params[k].default for k in keys}


def _fit_gaussian(adata, batch_key, seed, training, **model_kwargs) -> MethodOutput:
    import scvi

    kwargs = {**gaussian_ablation_kwargs(), **model_kwargs}
    return _train_scvi_like(scvi.model.SCVI, adata, batch_key, seed, training, kwargs)


def _qbm_extras(model):
    energy = np.asarray(model.get_energy(), dtype=np.float32)
    log_z = model.get_log_partition()
    return {"energy": energy}, {"log_z": float(log_z.value), "log_z_stderr": float(log_z.stderr)}


def _make_qbm_fit(prior: str) -> Callable[..., MethodOutput]:
    def fit(adata, batch_key, seed, training, **model_kwargs) -> MethodOutput:
        from scqbm import QBMVAE

        kwargs = {"prior": prior, **model_kwargs}
        return _train_scvi_like(
            QBMVAE, adata, batch_key, seed, training, kwargs, extra=_qbm_extras
        )

    fit.__name__ = f"_fit_qbmvae_{prior}"
    return fit


def _fit_harmony(adata, batch_key, seed, training) -> MethodOutput:
    import harmonypy

    start = time.perf_counter()
    result = harmonypy.run_harmony(
        np.asarray(adata.obsm["X_pca"], dtype=np.float64),
        adata.obs[[batch_key]],
        [batch_key],
        random_state=seed,
        verbose=False,
    )
    z = np.asarray(result.Z_corr)
    if z.shape[0] != adata.n_obs:  # harmonypy < 2 returns (d, n_cells)
        z = z.T
    return MethodOutput(np.ascontiguousarray(z, dtype=np.float32), time.perf_counter() - start)


def _fit_scanorama(adata, batch_key, seed, training) -> MethodOutput:
    import scanorama

    np.random.seed(seed)  # noqa: NPY002 (scanorama draws from numpy's global generator)
    start = time.perf_counter()
    batches = adata.obs[batch_key].astype(str).to_numpy()
    order = np.argsort(batches, kind="stable")
    names = np.unique(batches)
    parts = [AnnData(X=adata.X[batches == b].copy(), var=adata.var[[]].copy()) for b in names]
    scanorama.integrate_scanpy(parts, dimred=50, verbose=0)
    stacked = np.concatenate([p.obsm["X_scanorama"] for p in parts])
    embedding = np.empty_like(stacked)
    embedding[order] = stacked
    return MethodOutput(embedding.astype(np.float32), time.perf_counter() - start)


#: Registry of the suite's methods by name.
METHODS: dict[str, Method] = {
    m.name: m
    for m in [
        Method(
            "pca",
            "Unintegrated PCA (50 components of log-normalised counts)",
            _fit_pca,
            stochastic=False,
        ),
        Method(
            "scvi",
            "scVI, default architecture (n_latent=10), trained under the suite's regime",
            _fit_scvi,
            accepts_kwargs=True,
            trained=True,
        ),
        Method(
            "scvi_default",
            "scVI at its defaults, epochs included (scvi's heuristic, up to 400)",
            _fit_scvi_default,
            accepts_kwargs=True,
            trained=True,
        ),
        Method(
            "scvi_30x2",
            "scVI with n_latent=30, n_layers=2 (the scib-metrics tutorial setting)",
            _fit_scvi_30x2,
            accepts_kwargs=True,
            trained=True,
        ),
        Method(
            "gaussian_vae",
            "Gaussian-prior ablation: SCVI with QBMVAE's exact encoder trunk and decoder",
            _fit_gaussian,
            accepts_kwargs=True,
            trained=True,
        ),
        Method(
            "qbmvae_rbm",
            "QBMVAE, prior='rbm', default sampler",
            _make_qbm_fit("rbm"),
            accepts_kwargs=True,
            trained=True,
        ),
        Method(
            "qbmvae_bm",
            "QBMVAE, prior='bm', default sampler",
            _make_qbm_fit("bm"),
            accepts_kwargs=True,
            trained=True,
        ),
        Method(
            "qbmvae_factorial",
            "Factorial ablation: QBMVAE with prior='factorial' (couplings fixed at zero, fields "
            "only, exact log Z in closed form)",
            _make_qbm_fit("factorial"),
            accepts_kwargs=True,
            trained=True,
            requires_prior="factorial",
        ),
        Method(
            "harmony",
            "Harmony (harmonypy) on the 50-component PCA",
            _fit_harmony,
            needs_batch=True,
            requires="harmonypy",
        ),
        Method(
            "scanorama",
            "Scanorama (integrate_scanpy, 50 dimensions)",
            _fit_scanorama,
            stochastic=False,
            needs_batch=True,
            requires="scanorama",
        ),
    ]
}

DEFAULT_METHODS = (
    "pca",
    "scvi",
    "scvi_30x2",
    "gaussian_vae",
    "qbmvae_rbm",
    "qbmvae_bm",
    "qbmvae_factorial",
    "harmony",
    "scanorama",
)


_SPEC = re.compile(r"^(?P<name>[A-Za-z0-9_]+)(?:\((?P<args>.*)\))?$")


def resolve_method(spec: str) -> tuple[Method, dict]:
    """Look up a method by name, or a variant ``name(key=value, ...)`` with model arguments.

    Values are Python literals (``qbmvae_rbm(n_latent=16, beta=5.0)``,
    ``qbmvae_bm(relaxation='overlapping_exp')``); ``plan_kwargs={...}`` goes to ``train``
    (for example ``plan_kwargs={'n_epochs_kl_warmup': 5}``), and so do the entries of
    ``train_kwargs={...}`` (for example ``train_kwargs={'batch_size': 256}``).

    Returns
    -------
    The registered :class:`Method` and the keyword arguments of its model.

    """
    match = _SPEC.match(spec.replace(" ", ""))
    if match is None or match["name"] not in METHODS:
        raise ValueError(
            f"Unknown method {spec!r}; choose from {sorted(METHODS)} or a variant "
            "such as 'qbmvae_rbm(n_latent=16)'."
        )
    method = METHODS[match["name"]]
    if not match["args"]:
        return method, {}
    if not method.accepts_kwargs:
        raise ValueError(f"Method {method.name!r} takes no arguments (got {spec!r}).")
    try:
        call = ast.parse(f"f({match['args']})", mode="eval").body
        kwargs = {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords}
    except (SyntaxError, ValueError) as err:
        raise ValueError(f"Cannot parse the arguments of {spec!r}: {err}") from err
    if call.args or None in kwargs:
        raise ValueError(f"Method arguments must be key=value pairs, got {spec!r}.")
    return method, kwargs
