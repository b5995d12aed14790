"""Detectors on penultimate features that also use the last layer: SHE, NNGuide, fDBD and GradNorm.

SHE compares a feature with a stored pattern of its predicted class, NNGuide weights the energy by the
similarity to confident training features, fDBD measures the distance to the decision boundaries, and
GradNorm the size of the last layer's gradient of a KL divergence to the uniform distribution (computed in
closed form, since for the last layer it factorises into a feature norm and a probability norm).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, get_args

import torch
from torch import Tensor, nn

from dreamood._utils import DeviceLike
from dreamood._validation import check_choice, check_positive, check_positive_int
from dreamood.detectors.base import (
    LinearHeadDetector,
    check_labels,
    check_neighbors,
    check_predicted,
    class_means,
    finish_scores,
)
from dreamood.evaluation.scores import energy_score

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["FDBD", "SHE", "GradNorm", "NNGuide"]


class SHE(LinearHeadDetector):
    """Inner product of the feature with the stored pattern of its predicted class; higher = more ID.

    Zhang, Fu, Liu, Chen, Tang, Jiang, Kong. "Out-of-Distribution Detection based on In-Distribution Data
    Patterns Memorization with Modern Hopfield Energy", ICLR 2023 (the Simplified Hopfield Energy). ``fit``
    stores, per class ``c``, the mean ``m_c`` of the fit features of class ``c`` that the classifier predicts
    correctly; ``score(x) = x^T m_{argmax f(x)}``, in float64.

    Args:
        linear: The classifier's last layer, an ``nn.Linear`` or its weight ``(C, D)``.
        bias: The bias ``(C,)`` when ``linear`` is a weight tensor (``None``: no bias).
        device: Where the computation runs (``None``: the device of the features).

    Attributes:
        patterns_: Class patterns ``(C, D)``, float64 (NaN rows for classes without a correct fit sample).
        has_pattern_: Boolean ``(C,)``, which classes have a pattern.

    Raises:
        TypeError: If ``linear`` is not an ``nn.Linear`` or a floating-point tensor.
        ValueError: If the layer's shapes disagree.
    """

    reference = (
        "Zhang, Fu, Liu, Chen, Tang, Jiang, Kong. Out-of-Distribution Detection based on In-Distribution Data "
        "Patterns Memorization with Modern Hopfield Energy. ICLR 2023."
    )

    def __init__(self, linear: nn.Linear | Tensor, bias: Tensor | None = None, *, device: DeviceLike = None) -> None:
        super().__init__(linear, bias, device)

    def fit(self, features: Tensor, labels: Tensor | None = None) -> Self:
        """Store the mean correctly classified feature of every class.

        Args:
            features: In-distribution (training) features ``(N, D)``.
            labels: Their integer class labels ``(N,)`` in ``[0, C)`` (required).

        Returns:
            ``self``.

        Raises:
            TypeError: If ``features`` is not floating point or ``labels`` not integer.
            ValueError: If ``labels`` is missing, has the wrong length or a class outside ``[0, C)``, or no fit
                sample is classified correctly.
            NonFiniteError: If ``features`` contains NaN or infinity.
        """
        x = self._features64(features)
        labels = _class_labels(labels, x, self._weight.shape[0])
        predicted = self._logits(x).argmax(dim=1)
        correct = predicted == labels
        if not bool(correct.any()):
            raise ValueError("no fit sample is classified correctly: SHE needs correct samples to store patterns")
        patterns, counts = class_means(x[correct], labels[correct], self._weight.shape[0])
        self.patterns_, self.has_pattern_ = patterns, counts > 0
        return self

    def score(self, features: Tensor) -> Tensor:
        """Score a batch of features.

        Args:
            features: Penultimate features ``(N, D)``.

        Returns:
            Scores ``(N,)`` on the device of ``features``.

        Raises:
            NotFittedError: If :meth:`fit` has not been called.
            TypeError: If ``features`` is not floating point.
            ValueError: If ``features`` does not have ``D`` columns, or a sample is predicted as a class
                without a pattern.
            NonFiniteError: If ``features`` contains NaN or infinity.
        """
        self._check_fitted("patterns_")
        x = self._features64(features)
        predicted = self._logits(x).argmax(dim=1)
        check_predicted(self.has_pattern_.to(x.device), predicted, "had no correct fit sample")
        return finish_scores((x * self.patterns_.to(x.device)[predicted]).sum(dim=1), features, "SHE")


class NNGuide(LinearHeadDetector):
    """Energy times the mean similarity to the ``k`` nearest confidence-scaled training features; higher = ID.

    Park, Jung, Teoh. "Nearest Neighbor Guidance for Out-of-Distribution Detection", ICCV 2023. ``fit`` stores
    the bank ``b_i = s_i z_i / ||z_i||`` of fit features scaled by their energy ``s_i = logsumexp(W z_i + b)``;
    ``score(x) = logsumexp(W x + b) * mean_{top k} <x / ||x||, b_i>`` over the ``k`` largest inner products
    (the guidance), in float64. The paper's bank is a random fraction of the training set: pass that subset.

    Args:
        linear: The classifier's last layer, an ``nn.Linear`` or its weight ``(C, D)``.
        bias: The bias ``(C,)`` when ``linear`` is a weight tensor (``None``: no bias).
        k: Number of neighbours (paper and OpenOOD: 100).
        memory_budget_mb: Scratch memory bound of the similarity search.
        device: Where the computation runs (``None``: the device of the features).

    Attributes:
        bank_: The guidance bank ``(M, D)``, float64.

    Raises:
        TypeError: If ``linear`` is not an ``nn.Linear`` or a floating-point tensor, or ``k`` not an int.
        ValueError: If ``k`` or ``memory_budget_mb`` is not positive or the layer's shapes disagree.
    """

    reference = "Park, Jung, Teoh. Nearest Neighbor Guidance for Out-of-Distribution Detection. ICCV 2023."

    def __init__(
        self,
        linear: nn.Linear | Tensor,
        bias: Tensor | None = None,
        *,
        k: int = 100,
        memory_budget_mb: float = 512.0,
        device: DeviceLike = None,
    ) -> None:
        super().__init__(linear, bias, device)
        check_positive_int(k, "k")
        check_positive(memory_budget_mb, "memory_budget_mb")
        self.k = k
        self.memory_budget_mb = memory_budget_mb

    def _params(self) -> dict[str, object]:
        return {"k": self.k, **super()._params()}

    def _energy(self, x: Tensor) -> Tensor:
        return energy_score(self._logits(x))

    def fit(self, features: Tensor, labels: Tensor | None = None) -> Self:
        """Build the confidence-scaled bank from in-distribution features.

        Args:
            features: In-distribution features ``(M, D)`` with ``M >= k``.
            labels: Ignored.

        Returns:
            ``self``.

        Raises:
            TypeError: If ``features`` is not floating point.
            ValueError: If ``features`` does not have ``D`` columns or has fewer than ``k`` rows.
            NonFiniteError: If ``features`` contains NaN or infinity.
        """
        x = self._features64(features)
        check_neighbors(x, self.k)
        self.bank_ = nn.functional.normalize(x, dim=1) * self._energy(x).unsqueeze(1)
        return self

    def score(self, features: Tensor) -> Tensor:
        """Score a batch of features.

        Args:
            features: Penultimate features ``(N, D)``.

        Returns:
            Scores ``(N,)`` on the device of ``features``.

        Raises:
            NotFittedError: If :meth:`fit` has not been called.
            TypeError: If ``features`` is not floating point.
            ValueError: If ``features`` does not have ``D`` columns or ``k`` exceeds the bank size.
            NonFiniteError: If ``features`` contains NaN or infinity.
        """
        self._check_fitted("bank_")
        x = self._features64(features)
        bank = self.bank_.to(x.device)
        if self.k > bank.shape[0]:
            raise ValueError(f"k={self.k} exceeds the {bank.shape[0]} features of the bank")
        queries = nn.functional.normalize(x, dim=1)
        rows = max(1, int(self.memory_budget_mb * 2**20 // (8 * bank.shape[0])))
        guidance = torch.cat(
            [(chunk @ bank.T).topk(self.k, dim=1).values.mean(dim=1) for chunk in torch.split(queries, rows)]
        )
        return finish_scores(self._energy(x) * guidance, features, "NNGuide")


FdbdNormalizer = Literal["mean", "norm"]


class FDBD(LinearHeadDetector):
    """Mean feature distance to the decision boundaries of the predicted class, normalised; higher = more ID.

    Liu, Qin. "Fast Decision Boundary based Out-of-Distribution Detector", ICML 2024 (fDBD). For the predicted
    class ``y = argmax f(x)`` the distance of ``x`` to the boundary with class ``c`` is
    ``|f_y(x) - f_c(x)| / ||w_y - w_c||``; ``score(x) = sum_{c != y} |f_y(x) - f_c(x)| / ||w_y - w_c||``
    divided by ``||x - mu||`` (``normalizer="mean"``, ``mu`` the mean fit feature, the paper's choice) or by
    ``||x||`` (``"norm"``), in float64 (the sum over ``c`` is the paper's average times ``C - 1``, the
    authors' code).

    Args:
        linear: The classifier's last layer, an ``nn.Linear`` or its weight ``(C, D)`` with ``C >= 2``.
        bias: The bias ``(C,)`` when ``linear`` is a weight tensor (``None``: no bias).
        normalizer: ``"mean"`` (distance to the training mean) or ``"norm"`` (the feature norm).
        device: Where the computation runs (``None``: the device of the features).

    Attributes:
        mean_: Mean fit feature ``(D,)``, float64 (set by :meth:`fit`; needed for ``normalizer="mean"``).

    Raises:
        TypeError: If ``linear`` is not an ``nn.Linear`` or a floating-point tensor.
        ValueError: If ``normalizer`` is unknown, two classes have equal weight rows, or the layer's shapes
            disagree.
    """

    reference = "Liu, Qin. Fast Decision Boundary based Out-of-Distribution Detector. ICML 2024."

    def __init__(
        self,
        linear: nn.Linear | Tensor,
        bias: Tensor | None = None,
        *,
        normalizer: FdbdNormalizer = "mean",
        device: DeviceLike = None,
    ) -> None:
        super().__init__(linear, bias, device)
        check_choice(normalizer, get_args(FdbdNormalizer), "normalizer")
        self.normalizer: FdbdNormalizer = normalizer
        norms = torch.cdist(self._weight, self._weight)
        off_diagonal = ~torch.eye(norms.shape[0], dtype=torch.bool, device=norms.device)
        if self._weight.shape[0] < 2 or bool((norms[off_diagonal] == 0).any()):
            raise ValueError("fDBD needs at least two classes with distinct weight rows in the last layer")
        self._boundary_norms = norms.masked_fill(~off_diagonal, 1.0)

    def _params(self) -> dict[str, object]:
        return {"normalizer": self.normalizer, **super()._params()}

    def fit(self, features: Tensor, labels: Tensor | None = None) -> Self:
        """Store the mean in-distribution feature.

        Args:
            features: In-distribution (training) features ``(N, D)``.
            labels: Ignored.

        Returns:
            ``self``.

        Raises:
            TypeError: If ``features`` is not floating point.
            ValueError: If ``features`` does not have ``D`` columns.
            NonFiniteError: If ``features`` contains NaN or infinity.
        """
        self.mean_ = self._features64(features).mean(dim=0)
        return self

    def score(self, features: Tensor) -> Tensor:
        """Score a batch of features.

        Args:
            features: Penultimate features ``(N, D)``.

        Returns:
            Scores ``(N,)`` (``>= 0``) on the device of ``features``.

        Raises:
            NotFittedError: If ``normalizer="mean"`` and :meth:`fit` has not been called.
            TypeError: If ``features`` is not floating point.
            ValueError: If ``features`` does not have ``D`` columns.
            NonFiniteError: If ``features`` contains NaN or infinity, or a feature equals the normaliser's
                centre (division by zero).
        """
        if self.normalizer == "mean":
            self._check_fitted("mean_")
        x = self._features64(features)
        logits = self._logits(x)
        top, predicted = logits.max(dim=1)
        distances = (top.unsqueeze(1) - logits).abs() / self._boundary_norms.to(x.device)[predicted]
        centre = x - self.mean_.to(x.device) if self.normalizer == "mean" else x
        return finish_scores(distances.sum(dim=1) / torch.linalg.vector_norm(centre, dim=1), features, "fDBD")


class GradNorm(LinearHeadDetector):
    """L1 norm of the last layer's weight gradient of the KL divergence to the uniform; higher = more ID.

    Huang, Geng, Li. "On the Importance of Gradients for Detecting Distributional Shifts in the Wild",
    NeurIPS 2021. The loss ``L(x) = -1/C sum_c log softmax(f(x) / T)_c`` (the KL divergence from the uniform
    distribution up to a constant) has, for the last layer ``f = W x + b``, the weight gradient
    ``dL/dW = (softmax(f / T) - 1/C) x^T / T``; its entrywise L1 norm factorises as
    ``score(x) = (1/T) * sum_c |softmax(f(x)/T)_c - 1/C| * sum_j |x_j|``, which is what is computed (float64,
    no autograd needed). The paper backpropagates through the network to the last layer, with ``T = 1``.

    Args:
        linear: The classifier's last layer, an ``nn.Linear`` or its weight ``(C, D)``.
        bias: The bias ``(C,)`` when ``linear`` is a weight tensor (``None``: no bias).
        temperature: Softmax temperature ``T > 0`` (paper: 1).
        device: Where the computation runs (``None``: the device of the features).

    Raises:
        TypeError: If ``linear`` is not an ``nn.Linear`` or a floating-point tensor.
        ValueError: If ``temperature`` is not a finite number > 0 or the layer's shapes disagree.
    """

    reference = (
        "Huang, Geng, Li. On the Importance of Gradients for Detecting Distributional Shifts in the Wild. NeurIPS 2021."
    )

    def __init__(
        self,
        linear: nn.Linear | Tensor,
        bias: Tensor | None = None,
        *,
        temperature: float = 1.0,
        device: DeviceLike = None,
    ) -> None:
        super().__init__(linear, bias, device)
        check_positive(temperature, "temperature")
        self.temperature = temperature

    def _params(self) -> dict[str, object]:
        return {"temperature": self.temperature, **super()._params()}

    def score(self, features: Tensor) -> Tensor:
        """Score a batch of features.

        Args:
            features: Penultimate features ``(N, D)``.

        Returns:
            Scores ``(N,)`` (``>= 0``) on the device of ``features``.

        Raises:
            TypeError: If ``features`` is not floating point.
            ValueError: If ``features`` does not have ``D`` columns.
            NonFiniteError: If ``features`` contains NaN or infinity.
        """
        x = self._features64(features)
        logits = self._logits(x)
        p = torch.softmax(logits / self.temperature, dim=1)
        probability_norm = (p - 1.0 / p.shape[1]).abs().sum(dim=1)
        scores = probability_norm * x.abs().sum(dim=1) / self.temperature
        return finish_scores(scores, features, "GradNorm")


def _class_labels(labels: Tensor | None, x: Tensor, n_classes: int) -> Tensor:
    labels = check_labels(labels, x.shape[0]).to(x.device)
    if int(labels.min()) < 0 or int(labels.max()) >= n_classes:
        raise ValueError(
            f"labels must lie in [0, {n_classes - 1}] for the {n_classes} classes of the last layer, got values in "
            f"[{int(labels.min())}, {int(labels.max())}]"
        )
    return labels
