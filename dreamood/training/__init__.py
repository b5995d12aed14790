"""Phase 3 of DREAM-OOD: the energy outlier regulariser and the classifier training loop.

``train_classifier`` trains a classifier with cross-entropy plus ``beta`` times the energy regulariser on
imagined outliers (DREAM-OOD), generated inliers (DREAM-ID) or feature-space virtual outliers (VOS, NPOS), in
one process or under ``torchrun``. Labels may be integers or target distributions (mixed labels such as
CutMix's; :func:`soft_cross_entropy`). The matching test-time score is the negative energy:
``OODEvaluator(energy_score, model=model)`` with :func:`dreamood.evaluation.energy_score`.
"""

from dreamood.training.config import EpochMetrics, TrainingConfig, TrainingResult
from dreamood.training.loop import train_classifier
from dreamood.training.losses import soft_cross_entropy
from dreamood.training.regularizer import EnergyOODRegularizer, OutlierClassLoss, OutlierExposureLoss

__all__ = [
    "EnergyOODRegularizer",
    "EpochMetrics",
    "OutlierClassLoss",
    "OutlierExposureLoss",
    "TrainingConfig",
    "TrainingResult",
    "soft_cross_entropy",
    "train_classifier",
]
