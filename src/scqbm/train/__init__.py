from ._plan import QBMTrainingPlan
from ._semisupervised_plan import QBMSemiSupervisedTrainingPlan

__all__ = ["QBMSemiSupervisedTrainingPlan", "QBMTrainingPlan"]
