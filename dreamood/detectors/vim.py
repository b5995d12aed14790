"""ViM: virtual-logit matching of the feature residual outside the principal subspace."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from dreamood._utils import DeviceLike
from dreamood._validation import check_positive_int
from dreamood.detectors.base import LinearHeadDetector, finish_scores
from dreamood.evaluation.scores import energy_score

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["ViM"]


def default_principal_dim(feature_dim: int) -> int:
    """The principal dimension used by the ViM authors: 1000 for ``D >= 2048``, 512 for ``D >= 768``, else ``D // 2``.

    Args:
        feature_dim: Feature dimension ``D``.

    Returns:
        The principal dimension.
    """
    if feature_dim >= 2048:
        return 1000
    if feature_dim >= 768:
        return 512
    return feature_dim // 2


class ViM(LinearHeadDetector):
    """Energy minus a virtual logit measuring the feature residual off the principal subspace; higher = more ID.

    Wang, Li, Feng, Zhang. "ViM: Out-Of-Distribution with Virtual-logit Matching", CVPR 2022. ``fit`` moves the
    origin to ``o = -W^+ b`` (so that logits are linear in ``x - o``), takes the eigenvectors of the uncentred
    covariance of ``x - o`` (``torch.linalg.eigh``, float64) and keeps the ``D - dim`` of smallest eigenvalue as
    the residual space ``R``. The virtual logit is ``alpha * ||R^T (x - o)||`` with
    ``alpha = mean max-logit / mean residual norm`` over the fit features, and
    ``score(x) = logsumexp(W x + b) - alpha * ||R^T (x - o)||``.

    Args:
        linear: The classifier's last layer, an ``nn.Linear`` or its weight ``(C, D)``.
        bias: The bias ``(C,)`` when ``linear`` is a weight tensor (``None``: no bias).
        dim: Principal dimension, ``1 <= dim < D``; ``None`` picks :func:`default_principal_dim` of ``D``.
        device: Where the computation runs (``None``: the device of the features).

    Attributes:
        dim_: The principal dimension used.
        origin_: The origin ``o`` ``(D,)``, float64.
        residual_space_: Orthonormal basis ``R`` ``(D, D - dim)`` of the residual space, float64.
        alpha_: The virtual-logit scale.

    Raises:
        TypeError: If ``linear`` is not an ``nn.Linear`` or a floating-point tensor, or ``dim`` not an int.
        ValueError: If ``dim`` is not positive or the layer's shapes disagree.
    """

    reference = "Wang, Li, Feng, Zhang. ViM: Out-Of-Distribution with Virtual-logit Matching. CVPR 2022."

    def __init__(
        self,
        linear: nn.Linear | Tensor,
        bias: Tensor | None = None,
        *,
        dim: int | None = None,
        device: DeviceLike = None,
    ) -> None:
        super().__init__(linear, bias, device)
        self.dim = dim

    @property
    def dim(self) -> int | None:
        """Principal dimension (``None``: chosen from ``D``); setting it discards the fit."""
        return self._dim

    @dim.setter
    def dim(self, value: int | None) -> None:
        if value is not None:
            check_positive_int(value, "dim")
        self._dim = value
        self._reset()

    def _params(self) -> dict[str, object]:
        return {"dim": self.dim, **super()._params()}

    def fit(self, features: Tensor, labels: Tensor | None = None) -> Self:
        """Estimate the residual space and the virtual-logit scale from in-distribution features.

        Args:
            features: In-distribution penultimate features ``(N, D)``.
            labels: Ignored.

        Returns:
            ``self``.

        Raises:
            TypeError: If ``features`` is not floating point.
            ValueError: If ``features`` does not have ``D`` columns, ``dim >= D``, or the fit features have
                no residual off the principal subspace.
            NonFiniteError: If ``features`` contains NaN or infinity.
        """
        x = self._features64(features)
        feature_dim = x.shape[1]
        dim = default_principal_dim(feature_dim) if self.dim is None else self.dim
        if not 1 <= dim < feature_dim:
            raise ValueError(
                f"dim must satisfy 1 <= dim < the feature dimension D={feature_dim} (the residual space needs at "
                f"least one dimension), got dim={dim}"
            )
        weight, bias = self._weight.to(x.device), self._bias.to(x.device)
        origin = -(torch.linalg.pinv(weight) @ bias)
        centered = x - origin
        covariance = centered.T @ centered / x.shape[0]
        _, eigenvectors = torch.linalg.eigh(covariance)  # eigenvalues in ascending order
        residual_space = eigenvectors[:, : feature_dim - dim]
        mean_residual = float(torch.linalg.vector_norm(centered @ residual_space, dim=1).mean())
        if mean_residual <= 1e-12 * float(torch.linalg.vector_norm(centered, dim=1).mean()):
            raise ValueError(
                f"the fit features have no component outside their top {dim} principal directions: use a smaller dim"
            )
        mean_max_logit = float(self._logits(x).amax(dim=1).mean())
        self.dim_, self.origin_, self.residual_space_ = dim, origin, residual_space
        self.alpha_ = mean_max_logit / mean_residual
        return self

    def score(self, features: Tensor) -> Tensor:
        """Score a batch of features.

        Args:
            features: Penultimate features ``(N, D)``.

        Returns:
            Scores ``(N,)`` on the device of ``features``.

        Raises:
            NotFittedError: If :meth:`fit` has not been called since construction or the last change of ``dim``.
            TypeError: If ``features`` is not floating point.
            ValueError: If ``features`` does not have ``D`` columns.
            NonFiniteError: If ``features`` contains NaN or infinity.
        """
        self._check_fitted("residual_space_")
        x = self._features64(features)
        residual = (x - self.origin_.to(x.device)) @ self.residual_space_.to(x.device)
        virtual_logit = self.alpha_ * torch.linalg.vector_norm(residual, dim=1)
        return finish_scores(energy_score(self._logits(x)) - virtual_logit, features, "ViM")
