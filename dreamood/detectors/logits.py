"""Detectors that score classifier logits: MSP, MaxLogit and Energy. Nothing is learned; ``fit`` is a no-op."""

from __future__ import annotations

from torch import Tensor

from dreamood._utils import DeviceLike
from dreamood._validation import check_positive
from dreamood.detectors.base import Detector, check_batch, finish_scores
from dreamood.evaluation.scores import energy_score, max_logit_score, msp_score

__all__ = ["MSP", "Energy", "MaxLogit"]


class MSP(Detector):
    """Maximum softmax probability ``max_c softmax(f(x))_c``; higher = more in-distribution.

    Hendrycks, Gimpel. "A Baseline for Detecting Misclassified and Out-of-Distribution Examples in Neural
    Networks", ICLR 2017.

    Args:
        device: Where the computation runs (``None``: the device of the logits).
    """

    inputs = "logits"
    reference = (
        "Hendrycks, Gimpel. A Baseline for Detecting Misclassified and Out-of-Distribution Examples in Neural "
        "Networks. ICLR 2017."
    )

    def score(self, logits: Tensor) -> Tensor:
        """Score a batch of logits.

        Args:
            logits: Classifier logits ``(N, C)``.

        Returns:
            Scores ``(N,)`` in ``[1/C, 1]``, on the device of ``logits``.

        Raises:
            TypeError: If ``logits`` is not floating point.
            ValueError: If ``logits`` is not 2-D.
            NonFiniteError: If ``logits`` contains NaN or infinity.
        """
        logits = check_batch(logits, "logits")
        return finish_scores(msp_score(logits.to(self._compute_device(logits))), logits, "MSP")


class MaxLogit(Detector):
    """Maximum logit ``max_c f(x)_c``; higher = more in-distribution.

    Hendrycks, Basart, Mazeika, Zou, Kwon, Mostajabi, Steinhardt, Song. "Scaling Out-of-Distribution Detection
    for Real-World Settings", ICML 2022.

    Args:
        device: Where the computation runs (``None``: the device of the logits).
    """

    inputs = "logits"
    reference = (
        "Hendrycks, Basart, Mazeika, Zou, Kwon, Mostajabi, Steinhardt, Song. Scaling Out-of-Distribution "
        "Detection for Real-World Settings. ICML 2022."
    )

    def score(self, logits: Tensor) -> Tensor:
        """Score a batch of logits.

        Args:
            logits: Classifier logits ``(N, C)``.

        Returns:
            Scores ``(N,)`` on the device of ``logits``.

        Raises:
            TypeError: If ``logits`` is not floating point.
            ValueError: If ``logits`` is not 2-D.
            NonFiniteError: If ``logits`` contains NaN or infinity.
        """
        logits = check_batch(logits, "logits")
        return finish_scores(max_logit_score(logits.to(self._compute_device(logits))), logits, "MaxLogit")


class Energy(Detector):
    """Negative free energy ``T * logsumexp(f(x) / T)``; higher = more in-distribution.

    Liu, Wang, Owens, Li. "Energy-based Out-of-distribution Detection", NeurIPS 2020. This is also the
    test-time score of DREAM-OOD (``T = 1``).

    Args:
        temperature: Temperature ``T > 0``.
        device: Where the computation runs (``None``: the device of the logits).

    Raises:
        ValueError: If ``temperature`` is not a finite number > 0.
    """

    inputs = "logits"
    reference = "Liu, Wang, Owens, Li. Energy-based Out-of-distribution Detection. NeurIPS 2020."

    def __init__(self, temperature: float = 1.0, device: DeviceLike = None) -> None:
        super().__init__(device)
        check_positive(temperature, "temperature")
        self.temperature = temperature

    def _params(self) -> dict[str, object]:
        return {"temperature": self.temperature, **super()._params()}

    def score(self, logits: Tensor) -> Tensor:
        """Score a batch of logits.

        Args:
            logits: Classifier logits ``(N, C)``.

        Returns:
            Scores ``(N,)`` on the device of ``logits``.

        Raises:
            TypeError: If ``logits`` is not floating point.
            ValueError: If ``logits`` is not 2-D or ``temperature`` is not a finite number > 0.
            NonFiniteError: If ``logits`` contains NaN or infinity.
        """
        logits = check_batch(logits, "logits")
        scores = energy_score(logits.to(self._compute_device(logits)), self.temperature)
        return finish_scores(scores, logits, "Energy")
