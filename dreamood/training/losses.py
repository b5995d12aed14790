"""Cross-entropy against integer labels or target distributions (mixed labels such as CutMix's)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["soft_cross_entropy"]

# A row of a target distribution may miss a total of 1 by this much (float32 round-off of mixed labels).
DISTRIBUTION_ATOL = 1e-4


def soft_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy of ``logits`` against integer labels or probability rows (mixed labels).

    Args:
        logits: Classifier logits ``(N, C)``.
        targets: Labels ``(N,)`` (integers in ``[0, C)``) or target distributions ``(N, C)`` whose rows are
            non-negative and sum to 1.

    Returns:
        The scalar ``mean_n -sum_c t_nc log softmax(logits_n)_c``.

    Raises:
        TypeError: ``targets`` is neither an integer ``(N,)`` tensor nor a floating-point ``(N, C)`` tensor.
        ValueError: The shapes do not match, a label is out of range, or a row is not a distribution.
    """
    check_targets(targets, logits.shape[0], logits.shape[1], "targets")
    if targets.dim() == 1:
        return F.cross_entropy(logits, targets)
    return distribution_cross_entropy(logits, targets)


def distribution_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """``mean_n -sum_c t_nc log softmax(logits_n)_c`` for target distributions ``(N, C)``, without checks."""
    log_probs = F.log_softmax(logits, dim=1)
    return -(targets.to(log_probs.dtype) * log_probs).sum(dim=1).mean()


def bad_distribution_rows(targets: Tensor) -> Tensor:
    """Number of rows of ``targets`` ``(N, C)`` that are not distributions, as a 0-d tensor on their device."""
    sums = targets.double().sum(dim=1)
    # The tolerance of torch.allclose(sums, 1, atol=DISTRIBUTION_ATOL) with its default rtol of 1e-5.
    off = (sums - 1.0).abs() > DISTRIBUTION_ATOL + 1e-5
    return ((targets < 0).any(dim=1) | off | ~torch.isfinite(sums)).sum()


def check_targets(targets: Tensor, rows: int, num_classes: int, name: str) -> None:
    """Raise unless ``targets`` are ``rows`` labels in ``[0, num_classes)`` or ``rows`` distributions over them.

    Args:
        targets: The labels or target distributions.
        rows: Number of samples.
        num_classes: Number of classes (the model's outputs).
        name: The argument's name, for the messages.

    Raises:
        TypeError: ``targets`` is neither an integer ``(N,)`` tensor nor a floating-point ``(N, C)`` tensor.
        ValueError: The shapes do not match, a label is out of range, or a row is not a distribution.
    """
    if not isinstance(targets, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(targets).__name__}")
    if targets.dim() == 1 and not targets.is_floating_point() and targets.dtype != torch.bool:
        if targets.shape[0] != rows:
            raise ValueError(f"{name} has {targets.shape[0]} labels for {rows} images")
        if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= num_classes):
            raise ValueError(
                f"{name} must lie in [0, {num_classes}) for a model with {num_classes} outputs, got labels from "
                f"{int(targets.min())} to {int(targets.max())}"
            )
        return
    if targets.dim() == 2 and targets.is_floating_point():
        if tuple(targets.shape) != (rows, num_classes):
            raise ValueError(
                f"{name} must have shape ({rows}, {num_classes}) (one distribution per image), got "
                f"{tuple(targets.shape)}"
            )
        if int(bad_distribution_rows(targets)):
            raise ValueError(f"{name} rows must be probability distributions (non-negative, summing to 1)")
        return
    raise TypeError(
        f"{name} must be integer labels (N,) or target distributions (N, C), got dtype {targets.dtype} and shape "
        f"{tuple(targets.shape)}"
    )
