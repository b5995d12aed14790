"""OpenMax: recalibrate the logits with per-class Weibull models of the distance to the mean activation."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Literal, get_args

import torch
from torch import Tensor

from dreamood._utils import DeviceLike
from dreamood._validation import check_choice, check_positive_int
from dreamood.detectors.base import Detector, check_labels, finish_scores

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["OpenMax", "fit_weibull"]

OpenMaxDistance = Literal["eucos", "euclidean", "cosine"]


def fit_weibull(values: Tensor) -> tuple[float, float]:
    """Maximum-likelihood shape ``k`` and scale ``lambda`` of a two-parameter Weibull distribution.

    The shape solves ``sum x^k ln x / sum x^k - 1/k - mean(ln x) = 0`` (increasing in ``k``), found by
    bisection on ``log k`` in float64; then ``lambda = mean(x^k)^(1/k)``.

    Args:
        values: Positive samples ``(n,)`` with at least two distinct values.

    Returns:
        ``(shape, scale)``.

    Raises:
        ValueError: If a value is not positive or all values are equal.
    """
    x = values.detach().to(torch.float64).reshape(-1)
    if x.numel() < 2 or bool((x <= 0).any()):
        raise ValueError("a Weibull fit needs at least two positive values")
    top = float(x.max())
    if float(x.min()) == top:
        raise ValueError("a Weibull fit needs at least two distinct values (the tail distances are all equal)")
    y = x / top  # the shape is scale-invariant; this keeps y^k in range
    log_y = y.log()

    def equation(log_k: float) -> float:
        k = math.exp(log_k)
        weights = y.pow(k)
        return float((weights * log_y).sum() / weights.sum()) - 1.0 / k - float(log_y.mean())

    low, high = -20.0, 20.0
    for _ in range(200):
        middle = (low + high) / 2
        if middle in (low, high):
            break
        low, high = (middle, high) if equation(middle) < 0 else (low, middle)
    shape = math.exp((low + high) / 2)
    scale = top * float(y.pow(shape).mean()) ** (1.0 / shape)
    return shape, scale


class OpenMax(Detector):
    """One minus the OpenMax probability of the unknown class; higher = more in-distribution.

    Bendale, Boult. "Towards Open Set Deep Networks", CVPR 2016. ``fit`` takes the activation vectors (logits)
    of correctly classified ID samples; per class ``c`` it stores their mean ``mu_c`` and fits a Weibull
    distribution (:func:`fit_weibull`, maximum likelihood) to the ``tailsize`` largest distances to ``mu_c``.
    To score logits ``v``, the ``alpha`` top-ranked classes get weights ``(alpha + 1 - r) / alpha`` for rank
    ``r = 1..alpha`` (others 0); each class's logit is reduced to ``v_c (1 - w_c F_c(d_c))`` with
    ``F_c`` the Weibull CDF and ``d_c`` the distance of ``v`` to ``mu_c``, the removed parts sum to an
    unknown-class logit ``v_0``, and ``score = 1 - softmax([v_0, v'])_0``. Distances: ``"eucos"``
    (Euclidean / 200 + cosine distance, the authors' code), ``"euclidean"`` or ``"cosine"``. The authors fit
    the Weibull with libMR, which also shifts the tail; this maximum-likelihood fit can differ slightly.

    Args:
        tailsize: Number of largest distances per class the Weibull is fitted to (paper: 20).
        alpha: Number of top classes recalibrated (paper: 10; capped at the number of classes).
        distance: ``"eucos"``, ``"euclidean"`` or ``"cosine"``.
        device: Where the computation runs (``None``: the device of the logits).

    Attributes:
        means_: Mean activation vector per class ``(C, C)``, float64.
        shapes_: Weibull shape per class ``(C,)``, float64.
        scales_: Weibull scale per class ``(C,)``, float64.

    Raises:
        TypeError: If ``tailsize`` or ``alpha`` is not an int.
        ValueError: If ``tailsize < 2``, ``alpha < 1`` or ``distance`` is unknown.
    """

    inputs = "logits"
    reference = "Bendale, Boult. Towards Open Set Deep Networks. CVPR 2016."

    def __init__(
        self, *, tailsize: int = 20, alpha: int = 10, distance: OpenMaxDistance = "eucos", device: DeviceLike = None
    ) -> None:
        super().__init__(device)
        check_positive_int(tailsize, "tailsize")
        if tailsize < 2:
            raise ValueError(f"tailsize must be >= 2 (a Weibull fit needs two values), got {tailsize}")
        check_positive_int(alpha, "alpha")
        check_choice(distance, get_args(OpenMaxDistance), "distance")
        self.tailsize = tailsize
        self.alpha = alpha
        self.distance: OpenMaxDistance = distance

    def _params(self) -> dict[str, object]:
        return {"tailsize": self.tailsize, "alpha": self.alpha, "distance": self.distance, **super()._params()}

    def _distances(self, v: Tensor, means: Tensor) -> Tensor:
        """Distances ``(N, C)`` of every activation vector to every class mean."""
        euclidean = torch.cdist(v, means)
        if self.distance == "euclidean":
            return euclidean
        cosine = 1.0 - torch.nn.functional.normalize(v, dim=1) @ torch.nn.functional.normalize(means, dim=1).T
        return cosine if self.distance == "cosine" else euclidean / 200.0 + cosine

    def fit(self, logits: Tensor, labels: Tensor | None = None) -> Self:
        """Fit the class means and Weibull models on correctly classified ID logits.

        Args:
            logits: ID (training) logits ``(N, C)``.
            labels: Their class labels ``(N,)`` in ``[0, C)`` (required).

        Returns:
            ``self``.

        Raises:
            TypeError: If ``logits`` is not floating point or ``labels`` not integer.
            ValueError: If ``labels`` is missing or out of range, or a class has fewer than ``tailsize``
                correctly classified samples.
            NonFiniteError: If ``logits`` contains NaN or infinity.
        """
        _, v = self._checked(logits, "logits", dtype=torch.float64)
        labels = check_labels(labels, v.shape[0]).to(v.device)
        n_classes = v.shape[1]
        if int(labels.min()) < 0 or int(labels.max()) >= n_classes:
            raise ValueError(f"labels must lie in [0, {n_classes - 1}], got [{int(labels.min())}, {int(labels.max())}]")
        correct = v.argmax(dim=1) == labels
        means, shapes, scales = [], [], []
        for c in range(n_classes):
            rows = v[correct & (labels == c)]
            if rows.shape[0] < self.tailsize:
                raise ValueError(
                    f"class {c} has {rows.shape[0]} correctly classified fit samples, fewer than tailsize="
                    f"{self.tailsize}"
                )
            mean = rows.mean(dim=0)
            tail = self._distances(rows, mean.unsqueeze(0)).squeeze(1).topk(self.tailsize).values
            shape, scale = fit_weibull(tail)
            means.append(mean)
            shapes.append(shape)
            scales.append(scale)
        self.means_ = torch.stack(means)
        self.shapes_ = torch.tensor(shapes, dtype=torch.float64, device=v.device)
        self.scales_ = torch.tensor(scales, dtype=torch.float64, device=v.device)
        return self

    def probabilities(self, logits: Tensor) -> Tensor:
        """OpenMax probabilities ``(N, C + 1)``, float64; column 0 is the unknown class.

        Args:
            logits: Classifier logits ``(N, C)``.

        Returns:
            The probabilities on the compute device.

        Raises:
            NotFittedError: If :meth:`fit` has not been called.
            ValueError: If ``logits`` does not have ``C`` columns.
        """
        self._check_fitted("means_")
        _, v = self._checked(logits, "logits", self.means_.shape[0], torch.float64)
        means, shapes, scales = (t.to(v.device) for t in (self.means_, self.shapes_, self.scales_))
        alpha = min(self.alpha, v.shape[1])
        ranks = v.argsort(dim=1, descending=True)[:, :alpha]
        rank_weights = (alpha - torch.arange(alpha, dtype=torch.float64, device=v.device)) / alpha
        weights = torch.zeros_like(v).scatter_(1, ranks, rank_weights.expand(v.shape[0], -1))
        cdf = 1.0 - torch.exp(-((self._distances(v, means) / scales).pow(shapes)))
        kept = v * (1.0 - weights * cdf)
        unknown = (v - kept).sum(dim=1, keepdim=True)
        return torch.softmax(torch.cat([unknown, kept], dim=1), dim=1)

    def score(self, logits: Tensor) -> Tensor:
        """Score a batch of logits.

        Args:
            logits: Classifier logits ``(N, C)``.

        Returns:
            Scores ``(N,)`` in ``[0, 1]``, on the device of ``logits``.

        Raises:
            NotFittedError: If :meth:`fit` has not been called.
            TypeError: If ``logits`` is not floating point.
            ValueError: If ``logits`` does not have ``C`` columns.
            NonFiniteError: If ``logits`` contains NaN or infinity.
        """
        probabilities = self.probabilities(logits)
        return finish_scores(1.0 - probabilities[:, 0], logits, "OpenMax")
