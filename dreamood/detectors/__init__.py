"""Post-hoc OOD detectors on logits, penultimate features or model inputs; every score is higher = more ID.

Each detector names what it consumes in its ``inputs`` class attribute and its paper in ``reference``.
"""

from dreamood.detectors.base import Detector, InputKind, LinearHeadDetector, NotFittedError
from dreamood.detectors.distance import KNN, RMDS, Mahalanobis
from dreamood.detectors.dropout import MCDropout
from dreamood.detectors.feature_space import FDBD, SHE, GradNorm, NNGuide
from dreamood.detectors.layers import Gram, MultiLayerMahalanobis
from dreamood.detectors.logits import GEN, MSP, Energy, Entropy, KLMatching, MaxLogit, TemperatureScaling
from dreamood.detectors.odin import ODIN
from dreamood.detectors.openmax import OpenMax
from dreamood.detectors.rankfeat import RankFeat
from dreamood.detectors.shaping import ASH, DICE, SCALE, ReAct
from dreamood.detectors.vim import ViM

__all__ = [
    "ASH",
    "DICE",
    "FDBD",
    "GEN",
    "KNN",
    "MSP",
    "ODIN",
    "RMDS",
    "SCALE",
    "SHE",
    "Detector",
    "Energy",
    "Entropy",
    "GradNorm",
    "Gram",
    "InputKind",
    "KLMatching",
    "LinearHeadDetector",
    "MCDropout",
    "Mahalanobis",
    "MaxLogit",
    "MultiLayerMahalanobis",
    "NNGuide",
    "NotFittedError",
    "OpenMax",
    "RankFeat",
    "ReAct",
    "TemperatureScaling",
    "ViM",
]
