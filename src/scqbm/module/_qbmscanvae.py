"""QBMSCANVAEModule: the QBM-VAE with a cell-type classifier on its binary posterior."""

from __future__ import annotations

import torch
from scvi import REGISTRY_KEYS
from scvi.module import Classifier
from scvi.module.base import LossOutput, auto_move_data
from torch.nn import functional as F

from scqbm._compat import MODULE_KEYS

from ._qbmvae import QBMVAEModule


class QBMSCANVAEModule(QBMVAEModule):
    """QBM-VAE with a classifier of cell labels on the posterior probabilities ``q(z=1|x)``.

    The generative model, the Boltzmann prior, its negative phase and log Z are exactly those of
    :class:`~scqbm.module.QBMVAEModule`; labels enter only through the classification term that
    scANVI adds to its ELBO,

    ``loss = -ELBO(x) + classification_ratio * CE(classifier(q(x_l)), y_l)``,

    on the labelled cells ``x_l`` of each minibatch. scANVI's M2 path (``z2, y -> z1``) is
    not reproduced: with binary latents it would need a label-conditional Boltzmann machine,
    i.e. one log Z and one set of persistent chains per class, and the Boltzmann prior is
    already multimodal (its low-energy states play the role of cluster centres).

    The classifier reads the posterior probabilities rather than relaxed samples: they are the
    embedding that :meth:`~scqbm.QBMSCANVI.get_latent_representation` returns, they are
    deterministic (so training and prediction see the same input), and their gradient reaches
    every encoder unit (a spike-and-exponential sample is exactly 0 with probability ``1 - q``,
    and gives no gradient there).

    The classifier normalises its hidden layer per cell (layer norm) instead of per batch: the
    posterior probabilities of a freshly trained QBMVAE differ little between cells (a few
    hundredths per unit), and batch norm rescales them with the minibatch's statistics in
    training but with lagging running statistics (momentum 0.01) at prediction, so that train
    and predict disagree (on a separable synthetic set: 99% training accuracy, 43% predicted).
    Layer norm computes the same thing in both modes.

    Parameters
    ----------
    n_input
        Number of genes.
    n_labels
        Number of label codes in the registry. scvi's ``LabelsWithUnlabeledObsField`` always
        registers the unlabelled category, as the last code, so the classifier predicts the
        first ``n_labels - 1`` codes.
    linear_classifier
        A single linear layer instead of an MLP (as in :class:`scvi.module.SCANVAE`).
    classifier_parameters
        Keyword arguments of :class:`scvi.module.Classifier` (``n_hidden``, ``n_layers``,
        ``dropout_rate``, ``use_batch_norm`` (default ``False``), ``use_layer_norm`` (default
        ``True``), ...).
    **kwargs
        :class:`~scqbm.module.QBMVAEModule` arguments.

    """

    def __init__(
        self,
        n_input: int,
        n_labels: int = 0,
        linear_classifier: bool = False,
        classifier_parameters: dict | None = None,
        **kwargs,
    ):
        super().__init__(n_input=n_input, n_labels=n_labels, **kwargs)
        self.n_classes = n_labels - 1
        if self.n_classes < 1:
            raise ValueError(
                f"The labels field has {n_labels} code(s); a classifier needs at least one "
                "labelled category besides the unlabelled one."
            )
        params = {
            "n_layers": 0 if linear_classifier else kwargs.get("n_layers", 1),
            "n_hidden": 0 if linear_classifier else kwargs.get("n_hidden", 128),
            "dropout_rate": kwargs.get("dropout_rate", 0.1),
            "logits": True,
            # Layer norm, not batch norm: see the class docstring.
            "use_batch_norm": False,
            "use_layer_norm": True,
            **(classifier_parameters or {}),
        }
        self.classifier = Classifier(self.n_latent, n_labels=self.n_classes, **params)

    # ------------------------------------------------------------ classifier
    @auto_move_data
    def classify(
        self,
        x: torch.Tensor,
        batch_index: torch.Tensor | None = None,
        cont_covs: torch.Tensor | None = None,
        cat_covs: torch.Tensor | None = None,
        use_posterior_mean: bool = True,
    ) -> torch.Tensor:
        """Class logits ``(n_obs, n_classes)`` of cells, as :meth:`scvi.module.SCANVAE.classify`.

        ``use_posterior_mean=True``: from ``q(z=1|x)``; ``False``: from a binary draw
        ``z ~ q(z|x)`` (stochastic predictions).
        """
        if batch_index is None:
            batch_index = torch.zeros(x.shape[0], 1, dtype=torch.long, device=x.device)
        outputs = self.inference(
            x=x, batch_index=batch_index, cont_covs=cont_covs, cat_covs=cat_covs
        )
        probs = outputs[MODULE_KEYS.QZ_KEY].probs
        features = probs if use_posterior_mean else torch.bernoulli(probs)
        return self.classifier(features)

    @auto_move_data
    def classification_loss(
        self, labelled_tensors: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Cross-entropy on labelled cells; returns ``(loss, true codes, logits)``."""
        inputs = self._get_inference_input(labelled_tensors)
        y = labelled_tensors[REGISTRY_KEYS.LABELS_KEY]
        logits = self.classify(
            inputs[MODULE_KEYS.X_KEY],
            batch_index=inputs[MODULE_KEYS.BATCH_INDEX_KEY],
            cont_covs=inputs.get(MODULE_KEYS.CONT_COVS_KEY),
            cat_covs=inputs.get(MODULE_KEYS.CAT_COVS_KEY),
        )
        return F.cross_entropy(logits, y.view(-1).long()), y, logits

    # ------------------------------------------------------------------ loss
    def loss(
        self,
        tensors: dict[str, torch.Tensor],
        inference_outputs: dict,
        generative_outputs: dict,
        kl_weight: float | torch.Tensor = 1.0,
        labelled_tensors: dict[str, torch.Tensor] | None = None,
        classification_ratio: float | None = None,
        **kwargs,
    ) -> LossOutput:
        """The QBM-VAE's negative ELBO plus ``classification_ratio`` times the cross-entropy.

        ``**kwargs`` (the negative-phase samples during training) go to
        :meth:`QBMVAEModule.loss`.
        """
        output = super().loss(
            tensors, inference_outputs, generative_outputs, kl_weight=kl_weight, **kwargs
        )
        if labelled_tensors is None:
            return output
        ce_loss, true_labels, logits = self.classification_loss(labelled_tensors)
        ratio = 50.0 if classification_ratio is None else classification_ratio
        return LossOutput(
            loss=output.loss + ratio * ce_loss,
            reconstruction_loss=output.reconstruction_loss,
            kl_local=output.kl_local,
            kl_global=output.kl_global,
            classification_loss=ce_loss,
            true_labels=true_labels,
            logits=logits,
            extra_metrics=output.extra_metrics,
        )
