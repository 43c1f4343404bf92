from ._plan import QBMTrainingPlan

__all__ = ["QBMTrainingPlan"]
