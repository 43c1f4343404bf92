"""QBMSemiSupervisedTrainingPlan: scvi's semi-supervised plan with the Boltzmann negative phase."""

from __future__ import annotations

from scvi.train import SemiSupervisedTrainingPlan

from ._plan import QBMTrainingPlan


class QBMSemiSupervisedTrainingPlan(QBMTrainingPlan, SemiSupervisedTrainingPlan):
    """Training plan for :class:`~scqbm.module.QBMSCANVAEModule`.

    A composition of the two plans, each used unchanged: :class:`~scqbm.train.QBMTrainingPlan`
    draws the negative-phase samples of the prior, keeps log Z current and gives the prior its
    own optimizer group; :class:`scvi.train.SemiSupervisedTrainingPlan` (next in the method
    resolution order) splits each batch into all cells and labelled cells, adds the labelled
    cells and ``classification_ratio`` to the loss, and logs classification accuracy, F1 and
    calibration error.

    Parameters
    ----------
    module
        A :class:`~scqbm.module.QBMSCANVAEModule`.
    n_classes
        Number of labelled categories.
    classification_ratio
        Weight of the cross-entropy in the loss (scANVI's default, 50).
    **kwargs
        :class:`~scqbm.train.QBMTrainingPlan` arguments (``lr_prior``, ...) and
        :class:`scvi.train.SemiSupervisedTrainingPlan` ones (``lr``, ``n_epochs_kl_warmup``,
        ...).

    """

    def __init__(self, module, n_classes: int, *, classification_ratio: float = 50, **kwargs):
        super().__init__(
            module, n_classes=n_classes, classification_ratio=classification_ratio, **kwargs
        )
