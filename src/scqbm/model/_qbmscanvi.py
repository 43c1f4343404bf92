"""QBMSCANVI: semi-supervised QBM-VAE (cell-type labels), initialised from a trained QBMVAE."""

from __future__ import annotations

import logging
import warnings
from copy import deepcopy
from typing import TYPE_CHECKING, Literal

from scvi import REGISTRY_KEYS
from scvi.data import AnnDataManager
from scvi.data.fields import (
    CategoricalJointObsField,
    CategoricalObsField,
    LabelsWithUnlabeledObsField,
    LayerField,
    NumericalJointObsField,
    NumericalObsField,
)
from scvi.dataloaders import SemiSupervisedDataSplitter
from scvi.model.base import SemisupervisedTrainingMixin
from scvi.utils import setup_anndata_dsp

from scqbm._compat import FIELD_REGISTRIES_KEY, SETUP_ARGS_KEY, STATE_REGISTRY_KEY
from scqbm._validation import check_expression, check_obs_keys
from scqbm.module import QBMSCANVAEModule
from scqbm.train import QBMSemiSupervisedTrainingPlan

from ._qbmvae import QBMVAE

if TYPE_CHECKING:
    from anndata import AnnData

logger = logging.getLogger(__name__)


class QBMSCANVI(SemisupervisedTrainingMixin, QBMVAE):
    """Semi-supervised QBM-VAE: scANVI's workflow on binary latents with a Boltzmann prior.

    The usual path is :meth:`~scqbm.QBMSCANVI.from_qbmvae_model` on a trained
    :class:`~scqbm.QBMVAE`, as
    :meth:`scvi.model.SCANVI.from_scvi_model` on an SCVI model; then :meth:`train` (a few
    epochs), :meth:`predict` and :meth:`get_latent_representation`. Query cells are mapped
    with :meth:`prepare_query_anndata` and :meth:`load_query_data`, then predicted.

    The model is the QBMVAE's (same encoder, decoder, Boltzmann prior, negative phase and log Z)
    with a classifier of the labels on the posterior probabilities ``q(z=1|x)``, trained with
    scANVI's classification term, ``classification_ratio * CE``, on the labelled cells of each
    minibatch; unlabelled cells contribute their ELBO. Unlike scANVI, labels do not enter the
    generative model (no ``z2, y -> z`` path), see :class:`~scqbm.module.QBMSCANVAEModule`.

    Parameters
    ----------
    adata
        AnnData registered with :meth:`setup_anndata`. ``None`` only with ``registry``.
    registry
        Registry of a saved model (internal use by :meth:`load`).
    n_hidden, n_latent, n_layers, dropout_rate, dispersion, gene_likelihood
        As in :class:`~scqbm.QBMVAE`.
    use_observed_lib_size, prior, relaxation, beta, sampler, sampler_kwargs, log_partition
        As in :class:`~scqbm.QBMVAE`.
    linear_classifier
        A single linear layer as classifier instead of an MLP.
    classifier_parameters
        Keyword arguments of :class:`scvi.module.Classifier`.
    **kwargs
        Further :class:`~scqbm.module.QBMSCANVAEModule` arguments.

    Examples
    --------
    >>> import scqbm
    >>> adata = scqbm.datasets.kang_ifnb()
    >>> scqbm.QBMVAE.setup_anndata(adata, batch_key="stim")
    >>> vae = scqbm.QBMVAE(adata)
    >>> vae.train(max_epochs=20)
    >>> adata.obs["labels"] = adata.obs["cell_type_derived"].astype(str)
    >>> adata.obs.loc[adata.obs["stim"] == "STIM", "labels"] = "Unknown"
    >>> model = scqbm.QBMSCANVI.from_qbmvae_model(
    ...     vae, unlabeled_category="Unknown", labels_key="labels"
    ... )
    >>> model.train(max_epochs=10)
    >>> adata.obs["predicted"] = model.predict()

    """

    _module_cls = QBMSCANVAEModule
    _training_plan_cls = QBMSemiSupervisedTrainingPlan
    _data_splitter_cls = SemiSupervisedDataSplitter
    _LATENT_KEY = "X_qbmscanvi"

    def __init__(
        self,
        adata: AnnData | None = None,
        registry: dict | None = None,
        n_hidden: int = 128,
        n_latent: int = 32,
        n_layers: int = 1,
        dropout_rate: float = 0.1,
        dispersion: Literal["gene", "gene-batch", "gene-cell"] = "gene",
        gene_likelihood: Literal["zinb", "nb", "poisson", "normal"] = "zinb",
        use_observed_lib_size: bool = True,
        prior: Literal["bm", "rbm"] = "rbm",
        relaxation: Literal["spike_exp", "overlapping_exp"] = "spike_exp",
        beta: float = 3.0,
        sampler: str = "gibbs",
        sampler_kwargs: dict | None = None,
        log_partition: Literal["auto", "exact", "ais"] = "auto",
        linear_classifier: bool = False,
        classifier_parameters: dict | None = None,
        **kwargs,
    ):
        if dispersion == "gene-label":
            raise ValueError(
                "QBMSCANVI does not support dispersion='gene-label' (the labels are partly "
                "unknown); use 'gene', 'gene-batch' or 'gene-cell'."
            )
        super().__init__(
            adata,
            registry,
            n_hidden=n_hidden,
            n_latent=n_latent,
            n_layers=n_layers,
            dropout_rate=dropout_rate,
            dispersion=dispersion,
            gene_likelihood=gene_likelihood,
            use_observed_lib_size=use_observed_lib_size,
            prior=prior,
            relaxation=relaxation,
            beta=beta,
            sampler=sampler,
            sampler_kwargs=sampler_kwargs,
            log_partition=log_partition,
            linear_classifier=linear_classifier,
            classifier_parameters=classifier_parameters,
            **kwargs,
        )
        self._set_label_state()
        # Codes 0..n-2 are classes; scvi's labels field puts the unlabelled category last.
        self.n_labels = self.module.n_classes
        self.was_pretrained = False
        self.unsupervised_history_ = None
        self.semisupervised_history_ = None
        self._model_summary_string = (
            f"QBMSCANVI model (semi-supervised QBM-VAE), unlabeled_category: "
            f"{self.unlabeled_category_!r}, {self.n_labels} classes; "
            + self._model_summary_string.split("\n", 1)[-1]
        )
        self.init_params_ = self._get_init_params(locals())

    def _set_label_state(self) -> None:
        """Label mapping and labelled / unlabelled cells (mapping from the registry alone)."""
        if self.adata is not None:
            self._set_indices_and_labels()
            return
        # `load` without data: the registry has the mapping; `labels_` is restored by `load`.
        state = self.registry_[FIELD_REGISTRIES_KEY][REGISTRY_KEYS.LABELS_KEY][STATE_REGISTRY_KEY]
        self.original_label_key = state["original_key"]
        self.unlabeled_category_ = state["unlabeled_category"]
        self._label_mapping = state["categorical_mapping"]
        self._code_to_label = dict(enumerate(self._label_mapping))

    # ------------------------------------------------------------------ setup
    @classmethod
    @setup_anndata_dsp.dedent
    def setup_anndata(
        cls,
        adata: AnnData,
        labels_key: str,
        unlabeled_category: str,
        layer: str | None = None,
        batch_key: str | None = None,
        size_factor_key: str | None = None,
        categorical_covariate_keys: list[str] | None = None,
        continuous_covariate_keys: list[str] | None = None,
        **kwargs,
    ):
        """%(summary)s.

        Same fields and defaults as :meth:`scvi.model.SCANVI.setup_anndata`, with the input
        checks of :meth:`scqbm.QBMVAE.setup_anndata`.

        Parameters
        ----------
        %(param_adata)s
        %(param_labels_key)s
        %(param_unlabeled_category)s
        %(param_layer)s
        %(param_batch_key)s
        %(param_size_factor_key)s
        %(param_cat_cov_keys)s
        %(param_cont_cov_keys)s

        """
        setup_method_args = cls._get_setup_method_args(**locals())  # before any other local
        if labels_key is None:
            raise ValueError(
                "QBMSCANVI needs `labels_key`: the obs column with cell labels, where "
                "`unlabeled_category` marks the cells to predict."
            )
        # scArches query mapping (`load_query_data`) may omit the labels column: scvi then
        # marks every query cell as unlabelled.
        if kwargs.get("allow_missing_labels", False) and labels_key not in adata.obs:
            checked_labels_key = None
        else:
            checked_labels_key = labels_key
        check_obs_keys(
            adata,
            batch_key=batch_key,
            labels_key=checked_labels_key,
            size_factor_key=size_factor_key,
            categorical_covariate_keys=categorical_covariate_keys,
            continuous_covariate_keys=continuous_covariate_keys,
        )
        check_expression(adata, layer)
        anndata_fields = [
            LayerField(REGISTRY_KEYS.X_KEY, layer, is_count_data=True),
            CategoricalObsField(REGISTRY_KEYS.BATCH_KEY, batch_key),
            LabelsWithUnlabeledObsField(REGISTRY_KEYS.LABELS_KEY, labels_key, unlabeled_category),
            NumericalObsField(REGISTRY_KEYS.SIZE_FACTOR_KEY, size_factor_key, required=False),
            CategoricalJointObsField(REGISTRY_KEYS.CAT_COVS_KEY, categorical_covariate_keys),
            NumericalJointObsField(REGISTRY_KEYS.CONT_COVS_KEY, continuous_covariate_keys),
        ]
        adata_manager = AnnDataManager(fields=anndata_fields, setup_method_args=setup_method_args)
        adata_manager.register_fields(adata, **kwargs)
        cls.register_manager(adata_manager)

    # ----------------------------------------------------------- from QBMVAE
    @classmethod
    def from_qbmvae_model(
        cls,
        qbmvae_model: QBMVAE,
        unlabeled_category: str,
        labels_key: str | None = None,
        adata: AnnData | None = None,
        **qbmscanvi_kwargs,
    ) -> QBMSCANVI:
        """A QBMSCANVI with the weights of a trained QBMVAE (as ``SCANVI.from_scvi_model``).

        Encoder, decoder, Boltzmann prior, persistent negative-phase chains and the log Z
        estimate are copied; the classifier starts untrained. Train it with :meth:`train`
        (by default a few epochs, as scANVI after scVI).

        Parameters
        ----------
        qbmvae_model
            A trained :class:`~scqbm.QBMVAE`.
        unlabeled_category
            Value of ``labels_key`` that marks unlabelled cells (it need not occur).
        labels_key
            Obs column of the labels. ``None``: the ``labels_key`` the QBMVAE was set up with
            (an error if it had none). Given, it takes precedence.
        adata
            AnnData to use instead of the QBMVAE's (same genes and setup). ``None``: the
            QBMVAE's AnnData, which is then registered for QBMSCANVI too (as scvi does).
        **qbmscanvi_kwargs
            Further :class:`QBMSCANVI` arguments (``linear_classifier``,
            ``classifier_parameters``); architecture arguments are the QBMVAE's.

        Returns
        -------
        The new, untrained :class:`QBMSCANVI`.

        """
        if not isinstance(qbmvae_model, QBMVAE):
            raise TypeError(
                f"`qbmvae_model` must be a trained scqbm.QBMVAE, got "
                f"{type(qbmvae_model).__name__}. For an scvi.model.SCVI use "
                "scvi.model.SCANVI.from_scvi_model."
            )
        if not qbmvae_model.is_trained:
            raise ValueError("The QBMVAE has not been trained yet: call `train` first.")
        init_params = qbmvae_model.init_params_
        params = {
            **init_params["non_kwargs"],
            **{k: v for group in init_params["kwargs"].values() for k, v in group.items()},
        }
        for key in set(params) & set(qbmscanvi_kwargs):
            warnings.warn(
                f"Ignoring `{key}`: the QBMVAE was built with {key}={params[key]!r}.",
                UserWarning,
                stacklevel=2,
            )
            del qbmscanvi_kwargs[key]
        if params.get("dispersion") == "gene-label":
            raise ValueError(
                "The QBMVAE uses dispersion='gene-label', which QBMSCANVI does not support."
            )
        setup_args = deepcopy(qbmvae_model.registry[SETUP_ARGS_KEY])
        labels_key = labels_key or setup_args.get("labels_key")
        if labels_key is None:
            raise ValueError(
                "Pass `labels_key`: the QBMVAE was set up without one (the obs column with the "
                "labels, `unlabeled_category` marking unlabelled cells)."
            )
        setup_args["labels_key"] = labels_key
        if adata is None:
            adata = qbmvae_model.adata
            if adata is None:
                raise ValueError("The QBMVAE has no AnnData attached: pass `adata`.")
        else:
            qbmvae_model._validate_anndata(adata)
        cls.setup_anndata(adata, unlabeled_category=unlabeled_category, **setup_args)
        model = cls(adata, **params, **qbmscanvi_kwargs)
        result = model.module.load_state_dict(qbmvae_model.module.state_dict(), strict=False)
        stray = [k for k in result.missing_keys if not k.startswith("classifier.")]
        if stray or result.unexpected_keys:
            raise RuntimeError(
                "The QBMVAE's weights do not fit QBMSCANVI's module (missing "
                f"{stray[:5]}, unexpected {list(result.unexpected_keys)[:5]})."
            )
        model.was_pretrained = True
        return model

    @classmethod
    def from_scvi_model(
        cls,
        scvi_model: QBMVAE,
        unlabeled_category: str,
        labels_key: str | None = None,
        adata: AnnData | None = None,
        **qbmscanvi_kwargs,
    ) -> QBMSCANVI:
        """Alias of :meth:`~scqbm.QBMSCANVI.from_qbmvae_model` under scvi's name.

        ``scvi_model`` is a trained QBMVAE.
        """
        return cls.from_qbmvae_model(
            scvi_model,
            unlabeled_category=unlabeled_category,
            labels_key=labels_key,
            adata=adata,
            **qbmscanvi_kwargs,
        )
