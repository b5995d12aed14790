"""Detectors that score classifier logits: MSP, MaxLogit, Energy, Entropy, GEN, temperature scaling, KL-Matching.

MSP, MaxLogit, Energy, Entropy and GEN learn nothing (``fit`` is a no-op); temperature scaling learns its
temperature from held-out ID logits and labels, KL-Matching its class templates from ID logits.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Literal, get_args

import torch
from torch import Tensor

from dreamood._utils import DeviceLike
from dreamood._validation import check_choice, check_positive, check_positive_int
from dreamood.detectors.base import (
    Detector,
    check_labels,
    check_predicted,
    class_means,
    finish_scores,
)
from dreamood.evaluation.scores import energy_score, max_logit_score, msp_score

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["GEN", "MSP", "Energy", "Entropy", "KLMatching", "MaxLogit", "TemperatureScaling"]


def _score_logits(
    detector: Detector,
    logits: Tensor,
    compute: Callable[[Tensor], Tensor],
    name: str,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Check ``logits``, apply ``compute`` to them on the detector's device (in ``dtype``) and finish the scores."""
    logits, z = detector._checked(logits, "logits", dtype=dtype)
    return finish_scores(compute(z), logits, name)


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
        return _score_logits(self, logits, msp_score, "MSP")


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
        return _score_logits(self, logits, max_logit_score, "MaxLogit")


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
        return _score_logits(self, logits, lambda z: energy_score(z, self.temperature), "Energy")


class Entropy(Detector):
    """Negative Shannon entropy of the softmax, ``sum_c p_c log p_c``; higher = more in-distribution.

    Shannon. "A Mathematical Theory of Communication", Bell System Technical Journal 1948; as an OOD score with
    outlier exposure in Hendrycks, Mazeika, Dietterich. "Deep Anomaly Detection with Outlier Exposure",
    ICLR 2019. Computed from ``log_softmax`` in float64, so it stays exact for confident predictions.

    Args:
        device: Where the computation runs (``None``: the device of the logits).
    """

    inputs = "logits"
    reference = (
        "Shannon. A Mathematical Theory of Communication. Bell System Technical Journal 1948; used with outlier "
        "exposure by Hendrycks, Mazeika, Dietterich. Deep Anomaly Detection with Outlier Exposure. ICLR 2019."
    )

    def score(self, logits: Tensor) -> Tensor:
        """Score a batch of logits.

        Args:
            logits: Classifier logits ``(N, C)``.

        Returns:
            Scores ``(N,)`` in ``[-log C, 0]``, on the device of ``logits``.

        Raises:
            TypeError: If ``logits`` is not floating point.
            ValueError: If ``logits`` is not 2-D.
            NonFiniteError: If ``logits`` contains NaN or infinity.
        """

        def negative_entropy(z: Tensor) -> Tensor:
            log_p = torch.log_softmax(z, dim=1)
            return (log_p.exp() * log_p).sum(dim=1)

        return _score_logits(self, logits, negative_entropy, "Entropy", torch.float64)


class GEN(Detector):
    """Generalized entropy of the ``M`` largest softmax probabilities; higher = more in-distribution.

    Liu, Lochman, Zach. "GEN: Pushing the Limits of Softmax-Based Out-of-Distribution Detection", CVPR 2023.
    ``score(x) = -sum_{j in top M} p_j^gamma (1 - p_j)^gamma`` over the ``M`` largest probabilities
    ``p = softmax(f(x))`` (all of them when ``M >= C``), computed in float64.

    Args:
        gamma: Exponent ``0 < gamma < 1`` of the generalized entropy (paper: 0.1).
        m: Number ``M >= 1`` of top probabilities (paper: 100 on ImageNet-1k, 10 on CIFAR-10).
        device: Where the computation runs (``None``: the device of the logits).

    Raises:
        ValueError: If ``gamma`` is not in ``(0, 1)`` or ``m`` is not a positive int.
    """

    inputs = "logits"
    reference = "Liu, Lochman, Zach. GEN: Pushing the Limits of Softmax-Based Out-of-Distribution Detection. CVPR 2023."

    def __init__(self, gamma: float = 0.1, m: int = 100, device: DeviceLike = None) -> None:
        super().__init__(device)
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0.0 < gamma < 1.0:
            raise ValueError(f"gamma must be a number in (0, 1), got {gamma!r}")
        check_positive_int(m, "m")
        self.gamma = float(gamma)
        self.m = m

    def _params(self) -> dict[str, object]:
        return {"gamma": self.gamma, "m": self.m, **super()._params()}

    def score(self, logits: Tensor) -> Tensor:
        """Score a batch of logits.

        Args:
            logits: Classifier logits ``(N, C)``.

        Returns:
            Scores ``(N,)`` (``<= 0``), on the device of ``logits``.

        Raises:
            TypeError: If ``logits`` is not floating point.
            ValueError: If ``logits`` is not 2-D.
            NonFiniteError: If ``logits`` contains NaN or infinity.
        """

        def generalized_entropy(z: Tensor) -> Tensor:
            p = torch.softmax(z, dim=1)
            top = p.topk(min(self.m, p.shape[1]), dim=1).values
            return -(top.pow(self.gamma) * (1.0 - top).pow(self.gamma)).sum(dim=1)

        return _score_logits(self, logits, generalized_entropy, "GEN", torch.float64)


class TemperatureScaling(Detector):
    """Maximum softmax probability at a temperature fitted by likelihood on held-out ID data; higher = more ID.

    Guo, Pleiss, Sun, Weinberger. "On Calibration of Modern Neural Networks", ICML 2017.
    ``score(x) = max_c softmax(f(x) / T)_c``. ``fit`` chooses ``T`` minimising the negative log-likelihood
    ``mean_i [logsumexp(f(x_i) / T) - f(x_i)_{y_i} / T]`` of held-out ID logits and labels. The likelihood is
    convex in ``1 / T``, so ``fit`` finds the root of its derivative by bisection on ``log(1 / T)`` within
    ``[1e-3, 1e3]`` (to float64 precision; a bound is returned when the optimum lies beyond it).

    Args:
        temperature: A fixed temperature ``T > 0``; ``None`` (default) learns it in :meth:`fit`.
        device: Where the computation runs (``None``: the device of the logits).

    Attributes:
        temperature_: The temperature used (the fitted one, or ``temperature`` after :meth:`fit`).

    Raises:
        ValueError: If ``temperature`` is given and is not a finite number > 0.
    """

    inputs = "logits"
    reference = "Guo, Pleiss, Sun, Weinberger. On Calibration of Modern Neural Networks. ICML 2017."

    _BOUNDS = (1e-3, 1e3)

    def __init__(self, temperature: float | None = None, device: DeviceLike = None) -> None:
        super().__init__(device)
        if temperature is not None:
            check_positive(temperature, "temperature")
            self.temperature_ = float(temperature)
        self.temperature = temperature

    def _params(self) -> dict[str, object]:
        return {"temperature": self.temperature, **super()._params()}

    def fit(self, logits: Tensor, labels: Tensor | None = None) -> Self:
        """Fit the temperature on held-out ID logits (a no-op when ``temperature`` was given).

        Args:
            logits: Held-out ID logits ``(N, C)`` (not the training set, on which the network is overconfident).
            labels: Their class labels ``(N,)`` in ``[0, C)`` (required unless ``temperature`` was given).

        Returns:
            ``self``.

        Raises:
            TypeError: If ``logits`` is not floating point or ``labels`` not integer.
            ValueError: If ``labels`` is missing, has the wrong length or holds a class outside ``[0, C)``.
            NonFiniteError: If ``logits`` contains NaN or infinity.
        """
        if self.temperature is not None:
            self.temperature_ = float(self.temperature)
            return self
        _, z = self._checked(logits, "logits", dtype=torch.float64)
        labels = check_labels(labels, z.shape[0]).to(z.device)
        if int(labels.min()) < 0 or int(labels.max()) >= z.shape[1]:
            raise ValueError(
                f"labels must lie in [0, {z.shape[1] - 1}], got values in [{int(labels.min())}, {int(labels.max())}]"
            )
        true_logit = z.gather(1, labels.unsqueeze(1)).squeeze(1)

        def slope(log_beta: float) -> float:  # d NLL / d beta at beta = 1 / T = exp(log_beta)
            p = torch.softmax(math.exp(log_beta) * z, dim=1)
            return float(((p * z).sum(dim=1) - true_logit).mean())

        low, high = -math.log(self._BOUNDS[1]), -math.log(self._BOUNDS[0])
        if slope(low) >= 0:
            log_beta = low
        elif slope(high) <= 0:
            log_beta = high
        else:
            for _ in range(200):
                middle = (low + high) / 2
                if middle in (low, high):
                    break
                low, high = (middle, high) if slope(middle) < 0 else (low, middle)
            log_beta = (low + high) / 2
        self.temperature_ = math.exp(-log_beta)
        return self

    def score(self, logits: Tensor) -> Tensor:
        """Score a batch of logits.

        Args:
            logits: Classifier logits ``(N, C)``.

        Returns:
            Scores ``(N,)`` in ``[1/C, 1]``, on the device of ``logits``.

        Raises:
            NotFittedError: If no temperature was given and :meth:`fit` has not been called.
            TypeError: If ``logits`` is not floating point.
            ValueError: If ``logits`` is not 2-D.
            NonFiniteError: If ``logits`` contains NaN or infinity.
        """
        self._check_fitted("temperature_")
        return _score_logits(self, logits, lambda z: msp_score(z, self.temperature_), "TemperatureScaling")


KLTemplate = Literal["nearest", "predicted"]


class KLMatching(Detector):
    """Negative KL divergence between the softmax and the closest class template; higher = more ID.

    Hendrycks, Basart, Mazeika, Zou, Kwon, Mostajabi, Steinhardt, Song. "Scaling Out-of-Distribution Detection
    for Real-World Settings", ICML 2022. ``fit`` averages the softmax ``p = softmax(f(x))`` of the ID samples
    predicted as class ``k`` into a template ``d_k`` (classes never predicted get none), and
    ``score(x) = -min_k KL(p(x) || d_k)`` with ``KL(p || d) = sum_c p_c log(p_c / d_c)``, in float64.
    ``template="predicted"`` compares with the template of the predicted class only.

    Args:
        template: ``"nearest"`` (the minimum over all templates, as the paper and OpenOOD) or ``"predicted"``.
        device: Where the computation runs (``None``: the device of the logits).

    Attributes:
        templates_: The class templates ``(C, C)``, float64 (rows of classes never predicted are NaN).
        has_template_: Boolean ``(C,)``, which classes have a template.

    Raises:
        ValueError: If ``template`` is unknown.
    """

    inputs = "logits"
    reference = MaxLogit.reference

    def __init__(self, template: KLTemplate = "nearest", device: DeviceLike = None) -> None:
        super().__init__(device)
        check_choice(template, get_args(KLTemplate), "template")
        self.template: KLTemplate = template

    def _params(self) -> dict[str, object]:
        return {"template": self.template, **super()._params()}

    def fit(self, logits: Tensor, labels: Tensor | None = None) -> Self:
        """Average the softmax of the ID samples by predicted class.

        Args:
            logits: ID logits ``(N, C)`` (the paper uses a held-out ID set).
            labels: Ignored (the templates follow the predictions).

        Returns:
            ``self``.

        Raises:
            TypeError: If ``logits`` is not floating point.
            ValueError: If ``logits`` is not 2-D.
            NonFiniteError: If ``logits`` contains NaN or infinity.
        """
        _, z = self._checked(logits, "logits", dtype=torch.float64)
        p = torch.softmax(z, dim=1)
        predicted = p.argmax(dim=1)
        templates, counts = class_means(p, predicted, p.shape[1])  # NaN rows for classes never predicted
        self.templates_, self.has_template_ = templates, counts > 0
        return self

    def score(self, logits: Tensor) -> Tensor:
        """Score a batch of logits.

        Args:
            logits: Classifier logits ``(N, C)``.

        Returns:
            Scores ``(N,)`` (``<= 0``), on the device of ``logits``.

        Raises:
            NotFittedError: If :meth:`fit` has not been called.
            TypeError: If ``logits`` is not floating point.
            ValueError: If ``logits`` does not have ``C`` columns, or ``template="predicted"`` and a sample is
                predicted as a class that had no fit sample.
            NonFiniteError: If ``logits`` contains NaN or infinity.
        """
        self._check_fitted("templates_")
        logits, z = self._checked(logits, "logits", self.templates_.shape[0], torch.float64)
        log_p = torch.log_softmax(z, dim=1)
        has = self.has_template_.to(log_p.device)
        log_d = self.templates_.to(log_p.device)[has].clamp_min(torch.finfo(torch.float64).tiny).log()
        # KL(p || d_k) = sum_c p_c log p_c - sum_c p_c log d_kc, for every template k at once.
        p = log_p.exp()
        divergences = (p * log_p).sum(dim=1, keepdim=True) - p @ log_d.T
        if self.template == "nearest":
            return finish_scores(-divergences.amin(dim=1), logits, "KLMatching")
        predicted = log_p.argmax(dim=1)
        check_predicted(has, predicted, "had no fit sample (no template)")
        column = torch.cumsum(has.to(torch.int64), 0)[predicted] - 1  # the template's row among those kept
        return finish_scores(-divergences.gather(1, column.unsqueeze(1)).squeeze(1), logits, "KLMatching")
