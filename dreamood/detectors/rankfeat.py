"""RankFeat: remove the rank-1 component of a late feature map before the network's head."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from dreamood._utils import DeviceLike
from dreamood._validation import check_positive
from dreamood.detectors.base import Detector, check_images, eval_mode, finish_scores
from dreamood.evaluation.scores import energy_score

__all__ = ["RankFeat"]


class RankFeat(Detector):
    """Energy of the logits of a feature map whose largest singular component is removed; higher = more ID.

    Song, Sebe, Wang. "RankFeat: Rank-1 Feature Removal for Out-of-distribution Detection", NeurIPS 2022. Each
    sample's feature map ``X`` (``C x HW``, from ``feature_map``) is replaced by ``X - s_1 u_1 v_1^T`` (its
    largest singular value and vectors, exact SVD in float64), the rest of the network (``head``: pooling and
    the last layer) maps it to logits, and ``score(x) = T * logsumexp(logits / T)``. The paper removes the
    component at the last block (Block 4) and also reports Block 3; its fusion averages the two scores
    (average two ``RankFeat`` detectors to get it).

    Both callables are run in eval mode (modules' flags are restored afterwards) and without gradients.

    Args:
        feature_map: Images ``(N, ...)`` -> feature maps ``(N, C, H, W)`` (or ``(N, C, L)``).
        head: Feature maps -> logits ``(N, K)``.
        temperature: Energy temperature ``T > 0`` (paper: 1).
        device: Where the network runs (``None``: the device of ``feature_map``'s first parameter, else the
            batch's).

    Raises:
        TypeError: If ``feature_map`` or ``head`` is not callable.
        ValueError: If ``temperature`` is not a finite number > 0.
    """

    inputs = "images"
    reference = "Song, Sebe, Wang. RankFeat: Rank-1 Feature Removal for Out-of-distribution Detection. NeurIPS 2022."

    def __init__(
        self,
        feature_map: Callable[[Tensor], Tensor],
        head: Callable[[Tensor], Tensor],
        *,
        temperature: float = 1.0,
        device: DeviceLike = None,
    ) -> None:
        super().__init__(device)
        if not callable(feature_map) or not callable(head):
            raise TypeError("feature_map and head must be callables (images -> feature map -> logits)")
        check_positive(temperature, "temperature")
        self.feature_map = feature_map
        self.head = head
        self.temperature = temperature

    def _params(self) -> dict[str, object]:
        return {"temperature": self.temperature, **super()._params()}

    def remove_rank_one(self, maps: Tensor) -> Tensor:
        """Subtract each sample's rank-1 approximation from its feature map.

        Args:
            maps: Feature maps ``(N, C, ...)`` with at least one spatial axis.

        Returns:
            The maps without their largest singular component, same shape and dtype.

        Raises:
            ValueError: If ``maps`` has fewer than 3 dimensions, or one channel or one position (a rank-1
                matrix, which nothing would be left of).
        """
        if maps.dim() < 3:
            raise ValueError(f"the feature map must be (N, C, H, W) or (N, C, L), got shape {tuple(maps.shape)}")
        flat = maps.reshape(maps.shape[0], maps.shape[1], -1).to(torch.float64)
        if min(flat.shape[1], flat.shape[2]) < 2:
            raise ValueError(
                f"the feature map {tuple(maps.shape)} has one channel or one spatial position: removing its rank-1 "
                "component leaves nothing; take the map of an earlier block or use larger inputs"
            )
        u, s, vh = torch.linalg.svd(flat, full_matrices=False)
        rank_one = s[:, :1, None] * u[:, :, :1] @ vh[:, :1, :]
        removed: Tensor = (flat - rank_one).reshape(maps.shape).to(maps.dtype)
        return removed

    def score(self, x: Tensor) -> Tensor:
        """Score a batch of model inputs.

        Args:
            x: Inputs ``(N, ...)`` as ``feature_map`` takes them.

        Returns:
            Scores ``(N,)`` on the device of ``x``.

        Raises:
            TypeError: If ``x`` is not floating point.
            ValueError: If the feature map or the head's output has the wrong shape.
            NonFiniteError: If ``x`` or the scores contain NaN or infinity.
        """
        x = check_images(x)
        device = self._device_for(x, self.feature_map)
        with torch.no_grad(), eval_mode(self.feature_map, self.head):
            logits = self.head(self.remove_rank_one(self.feature_map(x.to(device))))
        if not isinstance(logits, Tensor) or logits.dim() != 2 or logits.shape[0] != x.shape[0]:
            raise ValueError(f"head must return logits of shape (N, K) with N = {x.shape[0]}")
        return finish_scores(energy_score(logits.to(torch.float64), self.temperature), x, "RankFeat")
