"""Post-hoc OOD detectors on logits, penultimate features or model inputs; every score is higher = more ID.

Each detector names what it consumes in its ``inputs`` class attribute and its paper in ``reference``.
"""

from dreamood.detectors.base import Detector, InputKind, LinearHeadDetector, NotFittedError
from dreamood.detectors.distance import KNN, Mahalanobis
from dreamood.detectors.logits import MSP, Energy, MaxLogit
from dreamood.detectors.odin import ODIN
from dreamood.detectors.shaping import DICE, ReAct
from dreamood.detectors.vim import ViM

__all__ = [
    "DICE",
    "KNN",
    "MSP",
    "ODIN",
    "Detector",
    "Energy",
    "InputKind",
    "LinearHeadDetector",
    "Mahalanobis",
    "MaxLogit",
    "NotFittedError",
    "ReAct",
    "ViM",
]
