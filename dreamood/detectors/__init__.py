"""Post-hoc OOD detectors; every score is higher = more in-distribution."""

from dreamood.detectors.base import Detector, InputKind, NotFittedError

__all__ = ["Detector", "InputKind", "NotFittedError"]
