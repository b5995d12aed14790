"""Detectors that reshape the last layer's computation before the energy score: ReAct, DICE, ASH and SCALE.

All take the classifier's last linear layer (an ``nn.Linear`` or its weight and bias), recompute the logits
from penultimate features after clipping activations (ReAct), dropping small weight contributions (DICE),
pruning and rescaling each sample's activations (ASH) or only rescaling them (SCALE), and score them with the
energy ``logsumexp(logits)`` (temperature 1).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, get_args

import torch
from torch import Tensor, nn

from dreamood._utils import DeviceLike
from dreamood._validation import check_choice
from dreamood.detectors.base import LinearHeadDetector, finish_scores, percentile_of
from dreamood.evaluation.scores import energy_score

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["ASH", "DICE", "SCALE", "ReAct", "kept_activations"]


class ReAct(LinearHeadDetector):
    """Energy of the logits recomputed from activations clipped at a high percentile; higher = more ID.

    Sun, Guo, Li. "ReAct: Out-of-distribution Detection With Rectified Activations", NeurIPS 2021.
    ``fit`` sets the clipping threshold ``c`` to the ``percentile``-th percentile of *all* activations of the fit
    features (every entry of the ``(N, D)`` matrix); ``score(x) = logsumexp(W min(x, c) + b)``.

    Args:
        linear: The classifier's last layer, an ``nn.Linear`` or its weight ``(C, D)``.
        bias: The bias ``(C,)`` when ``linear`` is a weight tensor (``None``: no bias).
        percentile: Percentile in ``[0, 100]`` of the fit activations used as threshold (paper: 90).
        device: Where the computation runs (``None``: the device of the features).

    Attributes:
        threshold_: The clipping threshold ``c``.

    Raises:
        TypeError: If ``linear`` is not an ``nn.Linear`` or a floating-point tensor.
        ValueError: If ``percentile`` is outside ``[0, 100]`` or the layer's shapes disagree.
    """

    reference = "Sun, Guo, Li. ReAct: Out-of-distribution Detection With Rectified Activations. NeurIPS 2021."

    def __init__(
        self,
        linear: nn.Linear | Tensor,
        bias: Tensor | None = None,
        *,
        percentile: float = 90.0,
        device: DeviceLike = None,
    ) -> None:
        super().__init__(linear, bias, device)
        self.percentile = percentile

    @property
    def percentile(self) -> float:
        """Percentile of the fit activations used as clipping threshold; setting it discards the fit."""
        return self._percentile

    @percentile.setter
    def percentile(self, value: float) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 100.0:
            raise ValueError(f"percentile must be a number in [0, 100], got {value!r}")
        self._percentile = float(value)
        self._reset()

    def _params(self) -> dict[str, object]:
        return {"percentile": self.percentile, **super()._params()}

    def fit(self, features: Tensor, labels: Tensor | None = None) -> Self:
        """Set the clipping threshold from in-distribution features.

        Args:
            features: In-distribution penultimate features ``(N, D)``.
            labels: Ignored.

        Returns:
            ``self``.

        Raises:
            TypeError: If ``features`` is not floating point.
            ValueError: If ``features`` does not have ``D`` columns.
            NonFiniteError: If ``features`` contains NaN or infinity.
        """
        _, x = self._checked(features, "features", self._weight.shape[1])
        self.threshold_ = percentile_of(x, self.percentile)
        return self

    def score(self, features: Tensor) -> Tensor:
        """Score a batch of features.

        Args:
            features: Penultimate features ``(N, D)``.

        Returns:
            Scores ``(N,)`` on the device of ``features``.

        Raises:
            NotFittedError: If :meth:`fit` has not been called since construction or the last change of
                ``percentile``.
            TypeError: If ``features`` is not floating point.
            ValueError: If ``features`` does not have ``D`` columns.
            NonFiniteError: If ``features`` contains NaN or infinity.
        """
        self._check_fitted("threshold_")
        x = self._features64(features)
        logits = self._logits(x.clamp(max=self.threshold_))
        return finish_scores(energy_score(logits), features, "ReAct")


class DICE(LinearHeadDetector):
    """Energy of the logits of a sparsified last layer; higher = more in-distribution.

    Sun, Li. "DICE: Leveraging Sparsification for Out-of-Distribution Detection", ECCV 2022. ``fit`` computes
    the mean fit feature ``m`` and the contribution matrix ``V = W * m`` (entry ``(c, j)`` is ``W[c, j] m[j]``),
    and keeps only the weights whose contribution is above the ``100 * sparsity``-th percentile of *all*
    ``C * D`` contributions; ``score(x) = logsumexp((W * mask) x + b)``. ``sparsity=0`` keeps every weight
    (plain energy).

    Args:
        linear: The classifier's last layer, an ``nn.Linear`` or its weight ``(C, D)``.
        bias: The bias ``(C,)`` when ``linear`` is a weight tensor (``None``: no bias).
        sparsity: Fraction ``p`` in ``[0, 1)`` of the contributions to drop (paper: 0.9 for CIFAR,
            0.7 for ImageNet).
        device: Where the computation runs (``None``: the device of the features).

    Attributes:
        mean_: Mean fit feature ``(D,)``, float64.
        threshold_: The contribution percentile.
        mask_: Boolean mask ``(C, D)`` of the kept weights.

    Raises:
        TypeError: If ``linear`` is not an ``nn.Linear`` or a floating-point tensor.
        ValueError: If ``sparsity`` is outside ``[0, 1)`` or the layer's shapes disagree.
    """

    reference = "Sun, Li. DICE: Leveraging Sparsification for Out-of-Distribution Detection. ECCV 2022."

    def __init__(
        self,
        linear: nn.Linear | Tensor,
        bias: Tensor | None = None,
        *,
        sparsity: float = 0.9,
        device: DeviceLike = None,
    ) -> None:
        super().__init__(linear, bias, device)
        self.sparsity = sparsity

    @property
    def sparsity(self) -> float:
        """Fraction of the weight contributions dropped; setting it discards the fit."""
        return self._sparsity

    @sparsity.setter
    def sparsity(self, value: float) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
            raise ValueError(f"sparsity must be a number in [0, 1), got {value!r}")
        self._sparsity = float(value)
        self._reset()

    def _params(self) -> dict[str, object]:
        return {"sparsity": self.sparsity, **super()._params()}

    def fit(self, features: Tensor, labels: Tensor | None = None) -> Self:
        """Choose the weights to keep from the mean in-distribution feature.

        Args:
            features: In-distribution penultimate features ``(N, D)``.
            labels: Ignored.

        Returns:
            ``self``.

        Raises:
            TypeError: If ``features`` is not floating point.
            ValueError: If ``features`` does not have ``D`` columns.
            NonFiniteError: If ``features`` contains NaN or infinity.
        """
        x = self._features64(features)
        mean = x.mean(dim=0)
        contributions = self._weight.to(x.device) * mean.unsqueeze(0)
        threshold = percentile_of(contributions, 100.0 * self.sparsity)
        # At sparsity 0 the threshold is the smallest contribution, which the strict ">" would still drop.
        mask = contributions > threshold if self.sparsity > 0 else torch.ones_like(contributions, dtype=torch.bool)
        self.mean_, self.threshold_, self.mask_ = mean, threshold, mask
        return self

    def score(self, features: Tensor) -> Tensor:
        """Score a batch of features.

        Args:
            features: Penultimate features ``(N, D)``.

        Returns:
            Scores ``(N,)`` on the device of ``features``.

        Raises:
            NotFittedError: If :meth:`fit` has not been called since construction or the last change of
                ``sparsity``.
            TypeError: If ``features`` is not floating point.
            ValueError: If ``features`` does not have ``D`` columns.
            NonFiniteError: If ``features`` contains NaN or infinity.
        """
        self._check_fitted("mask_")
        x = self._features64(features)
        logits = self._logits(x, self._weight.to(x.device) * self.mask_.to(x.device))
        return finish_scores(energy_score(logits), features, "DICE")


def _check_prune_percentile(value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 100.0:
        raise ValueError(f"percentile must be a number in [0, 100), got {value!r}")
    return float(value)


def kept_activations(dim: int, percentile: float) -> int:
    """How many of ``dim`` activations ASH and SCALE keep: ``dim - round(dim * percentile / 100)``.

    The rounding is Python's (half to even), as ``np.round`` in the authors' code.

    Args:
        dim: Number of activations per sample.
        percentile: Percentile in ``[0, 100)`` of the activations to prune.

    Returns:
        The number ``k`` of activations kept.
    """
    return dim - round(dim * percentile / 100.0)


def _kept_count(x: Tensor, percentile: float) -> int:
    """How many activations of each row of ``x`` ASH and SCALE keep; raise if ``percentile`` keeps none."""
    k = kept_activations(x.shape[1], _check_prune_percentile(percentile))
    if k < 1:
        raise ValueError(f"percentile={percentile} prunes all {x.shape[1]} activations; lower it")
    return k


def _top_k_only(x: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """``x`` with all but each row's ``k`` largest entries set to 0, and those entries' values and indices."""
    values, indices = x.topk(k, dim=1)
    return torch.zeros_like(x).scatter_(1, indices, values), values, indices


AshVariant = Literal["p", "b", "s"]


class ASH(LinearHeadDetector):
    """Energy of the logits of each sample's activations pruned and rescaled (ASH-P, -B, -S); higher = more ID.

    Djurisic, Bozanic, Ashok, Liu. "Extremely Simple Activation Shaping for Out-of-Distribution Detection",
    ICLR 2023. Per sample, the ``k = D - round(D * percentile / 100)`` largest activations of the penultimate
    feature ``x`` are kept and the others set to zero, then:

    * ``"p"`` (ASH-P): nothing more;
    * ``"b"`` (ASH-B): every kept activation is set to ``s1 / k``, with ``s1`` the sum of all activations;
    * ``"s"`` (ASH-S): the pruned vector is multiplied by ``exp(s1 / s2)``, ``s2`` the sum of the kept ones.

    ``score(x) = logsumexp(W a(x) + b)`` of the shaped activations ``a(x)``. The paper shapes the penultimate
    (pooled) activations of the networks it evaluates; nothing is learned, ``fit`` is a no-op.

    Args:
        linear: The classifier's last layer, an ``nn.Linear`` or its weight ``(C, D)``.
        bias: The bias ``(C,)`` when ``linear`` is a weight tensor (``None``: no bias).
        variant: ``"p"``, ``"b"`` or ``"s"`` (default, the paper's best).
        percentile: Percentile in ``[0, 100)`` of each sample's activations to prune. The paper's ImageNet
            choices: ASH-P 60, ASH-B 65, ASH-S 90; CIFAR: 90 (ASH-S: 95 on CIFAR-10).
        device: Where the computation runs (``None``: the device of the features).

    Raises:
        TypeError: If ``linear`` is not an ``nn.Linear`` or a floating-point tensor.
        ValueError: If ``variant`` is unknown, ``percentile`` is outside ``[0, 100)`` or the layer's shapes
            disagree.
    """

    reference = (
        "Djurisic, Bozanic, Ashok, Liu. Extremely Simple Activation Shaping for Out-of-Distribution Detection. "
        "ICLR 2023."
    )

    def __init__(
        self,
        linear: nn.Linear | Tensor,
        bias: Tensor | None = None,
        *,
        variant: AshVariant = "s",
        percentile: float = 90.0,
        device: DeviceLike = None,
    ) -> None:
        super().__init__(linear, bias, device)
        check_choice(variant, get_args(AshVariant), "variant")
        self.variant: AshVariant = variant
        self.percentile = _check_prune_percentile(percentile)

    def _params(self) -> dict[str, object]:
        return {"variant": self.variant, "percentile": self.percentile, **super()._params()}

    def shape(self, features: Tensor) -> Tensor:
        """The shaped activations ``a(x)`` of a batch, float64.

        Args:
            features: Penultimate features ``(N, D)``.

        Returns:
            Shaped activations ``(N, D)``, float64, on the compute device.

        Raises:
            ValueError: If ``features`` does not have ``D`` columns, or no activation would be kept.
        """
        x = self._features64(features)
        k = _kept_count(x, self.percentile)
        pruned, values, indices = _top_k_only(x, k)
        if self.variant == "p":
            return pruned
        total = x.sum(dim=1, keepdim=True)
        if self.variant == "b":
            return torch.zeros_like(x).scatter_(1, indices, (total / k).expand_as(values))
        return pruned * torch.exp(total / pruned.sum(dim=1, keepdim=True))

    def score(self, features: Tensor) -> Tensor:
        """Score a batch of features.

        Args:
            features: Penultimate features ``(N, D)``.

        Returns:
            Scores ``(N,)`` on the device of ``features``.

        Raises:
            TypeError: If ``features`` is not floating point.
            ValueError: If ``features`` does not have ``D`` columns.
            NonFiniteError: If ``features`` contains NaN or infinity, or the rescaling overflows.
        """
        shaped = self.shape(features)
        logits = self._logits(shaped)
        return finish_scores(energy_score(logits), features, f"ASH-{self.variant.upper()}")


class SCALE(LinearHeadDetector):
    """Energy of the logits of activations scaled by ASH-S's factor, without pruning; higher = more ID.

    Xu, Lian, Yang, Xiao, Chen, Li. "Scaling for Training Time and Post-hoc Out-of-distribution Detection
    Enhancement", ICLR 2024. With ``s1`` the sum of a sample's penultimate activations and ``s2`` the sum of its
    ``k = D - round(D * percentile / 100)`` largest, ``score(x) = logsumexp(W (x * exp(s1 / s2)) + b)``.
    Nothing is learned; ``fit`` is a no-op.

    Args:
        linear: The classifier's last layer, an ``nn.Linear`` or its weight ``(C, D)``.
        bias: The bias ``(C,)`` when ``linear`` is a weight tensor (``None``: no bias).
        percentile: Percentile in ``[0, 100)`` defining the top activations (paper: 85 on ImageNet).
        device: Where the computation runs (``None``: the device of the features).

    Raises:
        TypeError: If ``linear`` is not an ``nn.Linear`` or a floating-point tensor.
        ValueError: If ``percentile`` is outside ``[0, 100)`` or the layer's shapes disagree.
    """

    reference = (
        "Xu, Lian, Yang, Xiao, Chen, Li. Scaling for Training Time and Post-hoc Out-of-distribution Detection "
        "Enhancement. ICLR 2024."
    )

    def __init__(
        self,
        linear: nn.Linear | Tensor,
        bias: Tensor | None = None,
        *,
        percentile: float = 85.0,
        device: DeviceLike = None,
    ) -> None:
        super().__init__(linear, bias, device)
        self.percentile = _check_prune_percentile(percentile)

    def _params(self) -> dict[str, object]:
        return {"percentile": self.percentile, **super()._params()}

    def score(self, features: Tensor) -> Tensor:
        """Score a batch of features.

        Args:
            features: Penultimate features ``(N, D)``.

        Returns:
            Scores ``(N,)`` on the device of ``features``.

        Raises:
            TypeError: If ``features`` is not floating point.
            ValueError: If ``features`` does not have ``D`` columns, or no activation would be kept.
            NonFiniteError: If ``features`` contains NaN or infinity, or the rescaling overflows.
        """
        x = self._features64(features)
        k = _kept_count(x, self.percentile)
        top = x.topk(k, dim=1).values.sum(dim=1, keepdim=True)
        scaled = x * torch.exp(x.sum(dim=1, keepdim=True) / top)
        logits = self._logits(scaled)
        return finish_scores(energy_score(logits), features, "SCALE")
