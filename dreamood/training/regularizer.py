"""Outlier regularisers: the energy-based loss of DREAM-OOD (paper Eq. 7) and VOS, outlier exposure, K+1 classes.

All take ``(logits_id, logits_ood)`` and return a scalar loss that the training loop adds, times ``beta``, to
the ID cross-entropy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dreamood._validation import check_choice, check_floating, check_positive, check_positive_int, check_rank
from dreamood.evaluation.scores import TEMPERATURE_FORMS

__all__ = [
    "TEMPERATURE_FORMS",
    "EnergyOODRegularizer",
    "OutlierClassLoss",
    "OutlierExposureLoss",
]


class EnergyOODRegularizer(nn.Module):
    """Binary ID-vs-outlier loss on the negative energy of the classifier's logits.

    Du, Sun, Zhu, Li. "Dream the Impossible: Outlier Imagination with Diffusion Models", NeurIPS 2023 (Eq. 7);
    the same loss as Du, Wang, Cai, Li. "VOS: Learning What You Don't Know by Virtual Outlier Synthesis",
    ICLR 2022 (Eq. 5).

    Each sample's negative energy ``s(f) = T * logsumexp(f / T)`` (or, with
    ``temperature_form="scaled-logsumexp"``, the authors' ImageNet-100 form ``logsumexp(f) / T``) is mapped by a
    small head ``phi`` to two logits, and ``phi(s)`` is trained with cross-entropy to say 1 for ID samples and 0
    for outliers. The loss is the mean over all ID and outlier samples together; its gradient reaches both the
    logits (so the classifier learns to give outliers a low score) and ``phi``.

    With ``weighted=True`` the log-sum-exp carries a learnable non-negative weight per class, as in VOS:
    ``s(f) = T * log sum_c relu(w_c) * exp(f_c / T)``, with every ``w_c`` starting at 1 (so the weighted score
    starts equal to the plain one).

    Args:
        head: ``"mlp"`` for ``Linear(1, hidden_dim) -> ReLU -> Linear(hidden_dim, 2)`` (the paper on
            ImageNet-100) or ``"linear"`` for ``Linear(1, 2)`` (the paper on CIFAR-100, and VOS).
        hidden_dim: Width of the MLP head's hidden layer; ignored by the linear head.
        temperature: Energy temperature ``T > 0``.
        temperature_form: ``"free-energy"`` (``T * logsumexp(f / T)``, the default) or ``"scaled-logsumexp"``
            (``logsumexp(f) / T``, the authors' ImageNet-100 code); see :data:`TEMPERATURE_FORMS`. Both weighted
            forms put the weights inside the log-sum-exp in the same way.
        weighted: Learn one weight per class inside the log-sum-exp (VOS); needs ``num_classes``.
        num_classes: Number of classes (logit columns); required with ``weighted=True``, and when given the
            logits' width is checked against it.

    Attributes:
        head: The module ``phi`` mapping a ``(N, 1)`` score column to ``(N, 2)`` logits.
        class_weights: The per-class weights ``(num_classes,)`` when ``weighted``, else ``None``.

    Raises:
        ValueError: ``head`` is not ``"mlp"`` or ``"linear"``, a size or the temperature is not positive,
            ``temperature_form`` is unknown, or ``weighted=True`` without ``num_classes``.
    """

    class_weights: nn.Parameter | None

    def __init__(
        self,
        head: str = "mlp",
        hidden_dim: int = 512,
        temperature: float = 1.0,
        weighted: bool = False,
        num_classes: int | None = None,
        temperature_form: str = "free-energy",
    ) -> None:
        super().__init__()
        check_choice(head, ("mlp", "linear"), "head")
        check_choice(temperature_form, TEMPERATURE_FORMS, "temperature_form")
        check_positive_int(hidden_dim, "hidden_dim")
        check_positive(temperature, "temperature")
        if num_classes is not None:
            check_positive_int(num_classes, "num_classes")
        if weighted and num_classes is None:
            raise ValueError("num_classes must be given when weighted=True (one learnable weight per class)")
        self.head_type = head
        self.hidden_dim = hidden_dim
        self.temperature = float(temperature)
        self.temperature_form = temperature_form
        self.weighted = weighted
        self.num_classes = num_classes
        if head == "mlp":
            self.head: nn.Module = nn.Sequential(nn.Linear(1, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, 2))
        else:
            self.head = nn.Linear(1, 2)
        if weighted:
            assert num_classes is not None
            self.class_weights = nn.Parameter(torch.ones(num_classes))
        else:
            self.register_parameter("class_weights", None)

    def extra_repr(self) -> str:
        """Return the configuration shown by ``repr``."""
        form = "" if self.temperature_form == "free-energy" else f", temperature_form={self.temperature_form!r}"
        return f"temperature={self.temperature}{form}, weighted={self.weighted}, num_classes={self.num_classes}"

    def _check_logits(self, logits: Tensor, name: str) -> None:
        if not isinstance(logits, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(logits).__name__}")
        check_rank(logits, 2, name, "of shape (N, num_classes)")
        check_floating(logits, name)
        if logits.shape[0] == 0:
            raise ValueError(f"{name} is an empty batch (shape {tuple(logits.shape)}): at least one sample is needed")
        if logits.shape[1] == 0:
            raise ValueError(f"{name} has no class columns (shape {tuple(logits.shape)})")
        if self.num_classes is not None and logits.shape[1] != self.num_classes:
            raise ValueError(
                f"{name} has {logits.shape[1]} columns but the regulariser was built with "
                f"num_classes={self.num_classes} (shape {tuple(logits.shape)})"
            )

    def negative_energy(self, logits: Tensor) -> Tensor:
        """Return the (weighted, with ``weighted=True``) negative energy of each row of ``logits``.

        Args:
            logits: Classifier logits ``(N, C)``, floating point.

        Returns:
            Scores ``(N,)``, higher = more in-distribution.

        Raises:
            TypeError: ``logits`` is not a floating-point tensor.
            ValueError: ``logits`` is not a non-empty ``(N, C)`` batch, or ``C`` differs from ``num_classes``.
        """
        self._check_logits(logits, "logits")
        return self._negative_energy(logits)

    def _negative_energy(self, logits: Tensor) -> Tensor:
        free = self.temperature_form == "free-energy"
        if self.class_weights is None:
            if free:
                return self.temperature * torch.logsumexp(logits / self.temperature, dim=1)
            return torch.logsumexp(logits, dim=1) / self.temperature
        scaled = logits / self.temperature if free else logits
        # VOS's weighted log-sum-exp, shifted by the row maximum for stability. If every weight of a row
        # reaches 0 the score is -inf, which the training loop reports as a non-finite loss.
        shift = scaled.amax(dim=1, keepdim=True).detach()
        weighted_sum = (F.relu(self.class_weights) * torch.exp(scaled - shift)).sum(dim=1)
        log_sum = shift.squeeze(1) + torch.log(weighted_sum)
        return self.temperature * log_sum if free else log_sum / self.temperature

    def forward(self, logits_id: Tensor, logits_ood: Tensor) -> Tensor:
        """Return the regularisation loss ``L_ood`` of an ID batch and an outlier batch.

        Args:
            logits_id: Logits of in-distribution samples ``(N_id, C)``, labelled 1.
            logits_ood: Logits of outliers ``(N_ood, C)``, labelled 0; same ``C`` as ``logits_id``.

        Returns:
            The scalar cross-entropy of ``phi(s)`` averaged over the ``N_id + N_ood`` samples.

        Raises:
            TypeError: A batch is not a floating-point tensor.
            ValueError: A batch is empty or not 2-D, the two widths differ, or a width differs from
                ``num_classes``.
        """
        self._check_logits(logits_id, "logits_id")
        self._check_logits(logits_ood, "logits_ood")
        if logits_id.shape[1] != logits_ood.shape[1]:
            raise ValueError(
                f"logits_id and logits_ood must have the same number of columns, got shapes "
                f"{tuple(logits_id.shape)} and {tuple(logits_ood.shape)}"
            )
        scores = self._negative_energy(torch.cat([logits_id, logits_ood]))
        head_logits = self.head(scores.unsqueeze(1))
        targets = torch.cat(
            [
                torch.ones(logits_id.shape[0], dtype=torch.long, device=scores.device),
                torch.zeros(logits_ood.shape[0], dtype=torch.long, device=scores.device),
            ]
        )
        return F.cross_entropy(head_logits, targets)


def _check_pair(logits_id: Tensor, logits_ood: Tensor) -> None:
    for name, logits in (("logits_id", logits_id), ("logits_ood", logits_ood)):
        if not isinstance(logits, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(logits).__name__}")
        check_rank(logits, 2, name, "of shape (N, num_classes)")
        check_floating(logits, name)
    if logits_ood.shape[0] == 0:
        raise ValueError(f"logits_ood is an empty batch (shape {tuple(logits_ood.shape)}): outliers are needed")
    if logits_id.shape[1] != logits_ood.shape[1]:
        raise ValueError(
            f"logits_id and logits_ood must have the same number of columns, got shapes "
            f"{tuple(logits_id.shape)} and {tuple(logits_ood.shape)}"
        )


class OutlierExposureLoss(nn.Module):
    """Outlier exposure: cross-entropy from the outliers' softmax to the uniform distribution.

    Hendrycks, Mazeika, Dietterich. "Deep Anomaly Detection with Outlier Exposure", ICLR 2019; the authors'
    DREAM-OOD code offers it as ``--score OE``. The loss is ``mean_n (logsumexp(f_n) - mean_c f_nc)`` over the
    outliers; the ID logits are only checked. It has no parameters. At test time score with
    :func:`~dreamood.evaluation.msp_score` or :func:`~dreamood.evaluation.energy_score`.
    """

    def forward(self, logits_id: Tensor, logits_ood: Tensor) -> Tensor:
        """Return the outlier-exposure loss of an outlier batch (``logits_id`` fixes the expected width).

        Args:
            logits_id: Logits of in-distribution samples ``(N_id, C)``.
            logits_ood: Logits of outliers ``(N_ood, C)``, ``N_ood >= 1``.

        Returns:
            The scalar loss.

        Raises:
            TypeError: A batch is not a floating-point tensor.
            ValueError: A batch is not 2-D, the outlier batch is empty, or the widths differ.
        """
        _check_pair(logits_id, logits_ood)
        return (torch.logsumexp(logits_ood, dim=1) - logits_ood.mean(dim=1)).mean()


class OutlierClassLoss(nn.Module):
    """K+1 classes: outliers are labelled as an extra class ``K`` (the authors' ``--add_class``).

    The classifier has ``K + 1`` outputs; the ID samples keep their labels ``0..K-1`` (the training loop's
    cross-entropy) and this loss is the cross-entropy of the outliers against label ``K``. The authors' code
    takes one cross-entropy over the concatenated batch instead, ``(N_id * CE_id + N_ood * CE_ood) / (N_id +
    N_ood)``: that is ``N_id / (N_id + N_ood)`` times dreamood's ``CE_id + beta * CE_ood`` with ``beta = N_ood /
    N_id`` (so ``beta = 1`` and half the learning rate for equal batches). At test time score with
    :func:`~dreamood.evaluation.outlier_class_score`.

    Args:
        num_classes: ``K + 1``, the classifier's number of outputs (the last one is the outlier class).
    """

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        check_positive_int(num_classes, "num_classes")
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2 (K ID classes plus the outlier class), got {num_classes}")
        self.num_classes = num_classes

    def extra_repr(self) -> str:
        """Return the configuration shown by ``repr``."""
        return f"num_classes={self.num_classes}"

    def forward(self, logits_id: Tensor, logits_ood: Tensor) -> Tensor:
        """Return the cross-entropy of the outliers against the outlier class ``num_classes - 1``.

        Args:
            logits_id: Logits of in-distribution samples ``(N_id, K + 1)``.
            logits_ood: Logits of outliers ``(N_ood, K + 1)``, ``N_ood >= 1``.

        Returns:
            The scalar loss.

        Raises:
            TypeError: A batch is not a floating-point tensor.
            ValueError: A batch is not 2-D, the outlier batch is empty, or a width differs from ``num_classes``.
        """
        _check_pair(logits_id, logits_ood)
        if logits_ood.shape[1] != self.num_classes:
            raise ValueError(
                f"logits have {logits_ood.shape[1]} columns but the loss was built with num_classes={self.num_classes}"
            )
        targets = torch.full((logits_ood.shape[0],), self.num_classes - 1, dtype=torch.long, device=logits_ood.device)
        return F.cross_entropy(logits_ood, targets)
