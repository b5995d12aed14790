"""OOD scores computed from classifier logits; every score is *higher = more in-distribution*.

These are pure, differentiable functions of a ``(N, C)`` logit batch, usable as the ``scorer`` of
:class:`~dreamood.evaluation.OODEvaluator` and inside training losses. They do not check for NaN (that would
synchronise the device on every call); :func:`~dreamood.evaluation.ood_metrics` rejects non-finite scores.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dreamood._validation import check_choice, check_finite, check_floating, check_positive, check_rank

__all__ = ["TEMPERATURE_FORMS", "energy_score", "max_logit_score", "msp_score", "outlier_class_score"]

#: How the temperature enters :func:`energy_score`: ``"free-energy"`` is ``T * logsumexp(f / T)``,
#: ``"scaled-logsumexp"`` is ``logsumexp(f) / T`` (the authors' ImageNet-100 code). Equal at ``T = 1``.
TEMPERATURE_FORMS: tuple[str, ...] = ("free-energy", "scaled-logsumexp")


def _check_logits(logits: Tensor) -> None:
    if not isinstance(logits, Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    check_rank(logits, 2, "logits", "of shape (N, C)")
    check_floating(logits, "logits")
    if logits.shape[1] == 0:
        raise ValueError(f"logits must have at least one class column, got shape {tuple(logits.shape)}")


def energy_score(logits: Tensor, temperature: float = 1.0, form: str = "free-energy") -> Tensor:
    """Negative free energy ``T * logsumexp(logits / T)`` (or ``logsumexp(logits) / T``).

    Liu, Wang, Owens, Li. "Energy-based Out-of-distribution Detection", NeurIPS 2020. DREAM-OOD uses this
    score at test time (with ``T = 1``, where both forms agree).

    Args:
        logits: Classifier logits of shape ``(N, C)``, floating point.
        temperature: Temperature ``T > 0``.
        form: ``"free-energy"`` (``T * logsumexp(f / T)``) or ``"scaled-logsumexp"`` (``logsumexp(f) / T``);
            see :data:`TEMPERATURE_FORMS`.

    Returns:
        Scores of shape ``(N,)`` in the dtype of ``logits``.

    Raises:
        TypeError: ``logits`` is not a floating-point tensor.
        ValueError: ``logits`` is not ``(N, C)`` with ``C >= 1``, ``temperature`` is not a finite number > 0,
            or ``form`` is unknown.
        NonFiniteError: ``logits`` holds NaN or infinity.
    """
    _check_logits(logits)
    check_finite(logits, "logits")  # an infinite logit would give an infinite score, not a ranking
    check_positive(temperature, "temperature")
    check_choice(form, TEMPERATURE_FORMS, "form")
    if form == "scaled-logsumexp":
        return torch.logsumexp(logits, dim=1) / temperature
    return temperature * torch.logsumexp(logits / temperature, dim=1)


def msp_score(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Maximum softmax probability ``max_c softmax(logits / T)_c``.

    Hendrycks, Gimpel. "A Baseline for Detecting Misclassified and Out-of-Distribution Examples in Neural
    Networks", ICLR 2017.

    Args:
        logits: Classifier logits of shape ``(N, C)``, floating point.
        temperature: Softmax temperature ``T > 0`` (1 gives the original MSP).

    Returns:
        Scores of shape ``(N,)`` in ``[1/C, 1]``, in the dtype of ``logits``.

    Raises:
        TypeError: ``logits`` is not a floating-point tensor.
        ValueError: ``logits`` is not ``(N, C)`` with ``C >= 1``, or ``temperature`` is not a finite number > 0.
    """
    _check_logits(logits)
    check_positive(temperature, "temperature")
    return torch.softmax(logits / temperature, dim=1).amax(dim=1)


def max_logit_score(logits: Tensor) -> Tensor:
    """Maximum logit ``max_c logits_c``.

    Hendrycks, Basart, Mazeika, Zou, Kwon, Mostajabi, Steinhardt, Song. "Scaling Out-of-Distribution Detection
    for Real-World Settings", ICML 2022.

    Args:
        logits: Classifier logits of shape ``(N, C)``, floating point.

    Returns:
        Scores of shape ``(N,)`` in the dtype of ``logits``.

    Raises:
        TypeError: ``logits`` is not a floating-point tensor.
        ValueError: ``logits`` is not ``(N, C)`` with ``C >= 1``.
    """
    _check_logits(logits)
    return logits.amax(dim=1)


def outlier_class_score(logits: Tensor) -> Tensor:
    """Score of a K+1-class classifier whose last output is the outlier class: ``logsumexp(f_0..f_K-1) - f_K``.

    The log-odds of "one of the ID classes" against "the outlier class", ``log((1 - p_K) / p_K)``, a monotone
    function of ``1 - p_K`` (see :class:`~dreamood.training.OutlierClassLoss`).

    Args:
        logits: Logits ``(N, K + 1)``, floating point, ``K >= 1``.

    Returns:
        Scores of shape ``(N,)``, higher = more in-distribution.

    Raises:
        TypeError: ``logits`` is not a floating-point tensor.
        ValueError: ``logits`` is not ``(N, C)`` with ``C >= 2``.
    """
    _check_logits(logits)
    if logits.shape[1] < 2:
        raise ValueError(f"logits need at least 2 columns (ID classes and the outlier class), got {logits.shape[1]}")
    return torch.logsumexp(logits[:, :-1], dim=1) - logits[:, -1]
