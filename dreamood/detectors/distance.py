"""Distance-based detectors on penultimate features: Mahalanobis and RMDS (class Gaussians), KNN (neighbours)."""

from __future__ import annotations

from typing import TYPE_CHECKING, get_args

import torch
from torch import Tensor

from dreamood._utils import DeviceLike
from dreamood._validation import check_choice, check_positive, check_positive_int
from dreamood.detectors.base import Detector, check_labels, check_neighbors, class_means, finish_scores
from dreamood.knn import Backend, kth_neighbor_distance

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["KNN", "RMDS", "Mahalanobis", "squared_mahalanobis"]


def symmetric_pinv(matrix: Tensor) -> Tensor:
    """Pseudo-inverse of a symmetric positive semi-definite matrix via its eigendecomposition.

    Eigenvalues at or below ``n * eps * max_eigenvalue`` (the cutoff of ``scipy.linalg.pinvh``) are treated as
    zero, and so are negative ones, which for a covariance matrix can only come from rounding.

    Args:
        matrix: Symmetric matrix ``(n, n)``.

    Returns:
        The pseudo-inverse ``(n, n)``, in the dtype of ``matrix``.

    Raises:
        ValueError: If no eigenvalue is above the cutoff (the matrix is zero).
    """
    eigenvalues, eigenvectors = torch.linalg.eigh(matrix)
    cutoff = float(eigenvalues.abs().max()) * matrix.shape[0] * torch.finfo(matrix.dtype).eps
    keep = eigenvalues > cutoff
    if not bool(keep.any()):
        raise ValueError("the covariance matrix is zero: the features do not vary within their classes")
    kept: Tensor = eigenvectors[:, keep]
    inverse: Tensor = (kept / eigenvalues[keep]) @ kept.T
    return inverse


def squared_mahalanobis(x: Tensor, means: Tensor, precision: Tensor) -> Tensor:
    """Squared Mahalanobis distances ``(x_i - mu_c)^T P (x_i - mu_c)`` of every row to every mean, clamped at 0.

    Args:
        x: Points ``(N, D)``.
        means: Means ``(C, D)``.
        precision: Symmetric precision matrix ``(D, D)``.

    Returns:
        Distances ``(N, C)``.
    """
    x_precision = x @ precision
    # (x - mu)^T P (x - mu) = x^T P x - 2 x^T P mu + mu^T P mu, for all classes at once.
    squared = (
        (x_precision * x).sum(dim=1, keepdim=True)
        - 2.0 * x_precision @ means.T
        + ((means @ precision) * means).sum(dim=1).unsqueeze(0)
    )
    return squared.clamp(min=0.0)


def class_gaussians(x: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Sorted classes, class means and the tied within-class covariance ``1/N sum (x - mu_y)(x - mu_y)^T``.

    Args:
        x: Features ``(N, D)``, float64.
        labels: Integer labels ``(N,)`` on the device of ``x``.

    Returns:
        ``(classes (C,), means (C, D), covariance (D, D))``.
    """
    classes, inverse = torch.unique(labels, return_inverse=True)
    means, _ = class_means(x, inverse, classes.shape[0])
    centered = x - means[inverse]
    return classes, means, centered.T @ centered / x.shape[0]


class Mahalanobis(Detector):
    """Negative Mahalanobis distance to the closest class mean under a shared covariance; higher = more ID.

    Lee, Lee, Lee, Shin. "A Simple Unified Framework for Detecting Out-of-Distribution Samples and Adversarial
    Attacks", NeurIPS 2018. This is the feature-only form used by later benchmarks (no input preprocessing, no
    ensemble over layers): ``score(x) = -min_c (x - mu_c)^T S^+ (x - mu_c)`` with class means ``mu_c``, the tied
    within-class covariance ``S = 1/N sum_i (x_i - mu_{y_i})(x_i - mu_{y_i})^T`` and its symmetric
    pseudo-inverse ``S^+`` (see :func:`symmetric_pinv`). Statistics and scores are computed in float64.

    Args:
        device: Where the computation runs (``None``: the device of the features).

    Attributes:
        classes_: Sorted distinct labels ``(C,)``.
        means_: Class means ``(C, D)``, float64.
        covariance_: Tied covariance ``(D, D)``, float64.
        precision_: Its pseudo-inverse ``(D, D)``, float64.
    """

    inputs = "features"
    reference = (
        "Lee, Lee, Lee, Shin. A Simple Unified Framework for Detecting Out-of-Distribution Samples and "
        "Adversarial Attacks. NeurIPS 2018."
    )

    def fit(self, features: Tensor, labels: Tensor | None = None) -> Self:
        """Estimate the class means and the tied covariance.

        Args:
            features: In-distribution features ``(N, D)``.
            labels: Their integer class labels ``(N,)`` (required).

        Returns:
            ``self``.

        Raises:
            TypeError: If ``features`` is not floating point or ``labels`` not integer.
            ValueError: If ``labels`` is missing or its length differs, or the covariance is zero.
            NonFiniteError: If ``features`` contains NaN or infinity.
        """
        _, x = self._checked(features, "features", dtype=torch.float64)
        classes, means, covariance = class_gaussians(x, check_labels(labels, x.shape[0]).to(x.device))
        precision = symmetric_pinv(covariance)
        self.classes_, self.means_, self.covariance_, self.precision_ = classes, means, covariance, precision
        return self

    def score(self, features: Tensor) -> Tensor:
        """Score a batch of features.

        Args:
            features: Features ``(N, D)``.

        Returns:
            Scores ``(N,)`` (``<= 0``), on the device of ``features``.

        Raises:
            NotFittedError: If :meth:`fit` has not been called.
            TypeError: If ``features`` is not floating point.
            ValueError: If ``features`` does not have ``D`` columns.
            NonFiniteError: If ``features`` contains NaN or infinity.
        """
        self._check_fitted("means_", "precision_")
        features, x = self._checked(features, "features", self.means_.shape[1], torch.float64)
        device = x.device
        squared = squared_mahalanobis(x, self.means_.to(device), self.precision_.to(device))
        return finish_scores(-squared.amin(dim=1), features, "Mahalanobis")


class RMDS(Mahalanobis):
    """Relative Mahalanobis distance: class distance minus the distance to one background Gaussian; higher = ID.

    Ren, Fort, Liu, Roy, Padhy, Lakshminarayanan. "A Simple Fix to Mahalanobis Distance for Improving Near-OOD
    Detection", ICML 2021 Workshop on Uncertainty and Robustness in Deep Learning (arXiv:2106.09022). With the
    class Gaussians of :class:`Mahalanobis` (``MD_c``) and one Gaussian fit to all features, mean ``mu_0`` and
    covariance ``S_0 = 1/N sum_i (x_i - mu_0)(x_i - mu_0)^T`` (``MD_0``), ``RMD_c(x) = MD_c(x) - MD_0(x)`` and
    ``score(x) = -min_c RMD_c(x)`` (squared distances, pseudo-inverses, float64).

    Args:
        device: Where the computation runs (``None``: the device of the features).

    Attributes:
        classes_: Sorted distinct labels ``(C,)``.
        means_: Class means ``(C, D)``, float64.
        covariance_: Tied within-class covariance ``(D, D)``, float64.
        precision_: Its pseudo-inverse ``(D, D)``, float64.
        background_mean_: Mean ``mu_0`` of all fit features ``(D,)``, float64.
        background_precision_: Pseudo-inverse of ``S_0`` ``(D, D)``, float64.
    """

    reference = (
        "Ren, Fort, Liu, Roy, Padhy, Lakshminarayanan. A Simple Fix to Mahalanobis Distance for Improving "
        "Near-OOD Detection. ICML 2021 Workshop on Uncertainty and Robustness in Deep Learning (arXiv:2106.09022)."
    )

    def fit(self, features: Tensor, labels: Tensor | None = None) -> Self:
        """Estimate the class Gaussians and the background Gaussian.

        Args:
            features: In-distribution features ``(N, D)``.
            labels: Their integer class labels ``(N,)`` (required).

        Returns:
            ``self``.

        Raises:
            TypeError: If ``features`` is not floating point or ``labels`` not integer.
            ValueError: If ``labels`` is missing or its length differs, or a covariance is zero.
            NonFiniteError: If ``features`` contains NaN or infinity.
        """
        super().fit(features, labels)
        _, x = self._checked(features, "features", dtype=torch.float64)
        mean = x.mean(dim=0)
        centered = x - mean
        self.background_mean_ = mean
        self.background_precision_ = symmetric_pinv(centered.T @ centered / x.shape[0])
        return self

    def score(self, features: Tensor) -> Tensor:
        """Score a batch of features.

        Args:
            features: Features ``(N, D)``.

        Returns:
            Scores ``(N,)``, on the device of ``features``.

        Raises:
            NotFittedError: If :meth:`fit` has not been called.
            TypeError: If ``features`` is not floating point.
            ValueError: If ``features`` does not have ``D`` columns.
            NonFiniteError: If ``features`` contains NaN or infinity.
        """
        self._check_fitted("means_", "precision_", "background_precision_")
        features, x = self._checked(features, "features", self.means_.shape[1], torch.float64)
        device = x.device
        class_distances = squared_mahalanobis(x, self.means_.to(device), self.precision_.to(device))
        background = squared_mahalanobis(
            x, self.background_mean_.to(device).unsqueeze(0), self.background_precision_.to(device)
        )
        return finish_scores(-(class_distances - background).amin(dim=1), features, "RMDS")


class KNN(Detector):
    """Negative distance to the ``k``-th nearest L2-normalised training feature; higher = more ID.

    Sun, Ming, Zhu, Li. "Out-of-Distribution Detection with Deep Nearest Neighbors", ICML 2022. Features are
    scaled to unit norm (a zero vector stays zero) and the exact search of :mod:`dreamood.knn` finds the
    ``k``-th neighbour among the normalised fit features.

    Args:
        k: Which neighbour (the paper uses 50 on CIFAR and 1000 on ImageNet).
        backend: k-NN backend, ``"auto"``, ``"torch"`` or ``"faiss"`` (see :func:`dreamood.knn.knn_search`).
        device: Where the search runs (``None``: the device of the features).
        memory_budget_mb: Scratch memory bound of the torch backend.

    Attributes:
        bank_: The normalised fit features ``(M, D)``.

    Raises:
        TypeError: If ``k`` is not an int.
        ValueError: If ``k``, ``backend`` or ``memory_budget_mb`` is out of range.
    """

    inputs = "features"
    reference = "Sun, Ming, Zhu, Li. Out-of-Distribution Detection with Deep Nearest Neighbors. ICML 2022."

    def __init__(
        self, k: int = 50, backend: Backend = "auto", device: DeviceLike = None, memory_budget_mb: float = 512.0
    ) -> None:
        super().__init__(device)
        check_positive_int(k, "k")
        check_choice(backend, get_args(Backend), "backend")
        check_positive(memory_budget_mb, "memory_budget_mb")
        self.k = k
        self.backend: Backend = backend
        self.memory_budget_mb = memory_budget_mb

    def _params(self) -> dict[str, object]:
        return {"k": self.k, "backend": self.backend, **super()._params()}

    def fit(self, features: Tensor, labels: Tensor | None = None) -> Self:
        """Store the normalised in-distribution features.

        Args:
            features: In-distribution features ``(M, D)`` with ``M >= k``.
            labels: Ignored.

        Returns:
            ``self``.

        Raises:
            TypeError: If ``features`` is not floating point.
            ValueError: If ``features`` has fewer than ``k`` rows.
            NonFiniteError: If ``features`` contains NaN or infinity.
        """
        _, x = self._checked(features, "features")
        check_neighbors(x, self.k)
        self.bank_ = torch.nn.functional.normalize(x, dim=1)
        return self

    def score(self, features: Tensor) -> Tensor:
        """Score a batch of features.

        Args:
            features: Features ``(N, D)``.

        Returns:
            Scores ``(N,)`` in ``[-2, 0]``, on the device of ``features``.

        Raises:
            NotFittedError: If :meth:`fit` has not been called.
            TypeError: If ``features`` is not floating point.
            ValueError: If ``features`` does not have ``D`` columns or ``k`` exceeds the number of fit features.
            NonFiniteError: If ``features`` contains NaN or infinity.
        """
        self._check_fitted("bank_")
        features, x = self._checked(features, "features", self.bank_.shape[1])
        queries = torch.nn.functional.normalize(x, dim=1)
        distances = kth_neighbor_distance(
            queries,
            self.bank_,
            self.k,
            backend=self.backend,
            device=queries.device,
            memory_budget_mb=self.memory_budget_mb,
        )
        return finish_scores(-distances, features, "KNN")
