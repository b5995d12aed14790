"""The cosine learning-rate schedule of every training loop of dreamood, updated at every step.

The learning rate of step ``t`` of ``T`` is ``lr * (r + (1 - r) * (1 + cos(pi * t / T)) / 2)`` with
``r = min_lr / lr``: ``lr`` at the first step, ``min_lr`` after the last, as in the DREAM-OOD recipe (Du et al.,
NeurIPS 2023). It runs as torch's own ``LambdaLR``, so its state is saved and restored like any scheduler's.
``CosineAnnealingLR`` is not used because it updates the rate recursively from the previous one, which drifts
from this closed form by a few units in the last place; the closed form keeps every step's rate exact.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from dreamood._validation import check_positive, check_positive_int

__all__ = ["cosine_factor", "cosine_schedule"]


def cosine_factor(total_steps: int, min_ratio: float) -> Callable[[int], float]:
    """The factor ``r + (1 - r) * (1 + cos(pi * min(t, T) / T)) / 2`` of step ``t``, as a function of ``t``.

    Args:
        total_steps: The number of steps ``T`` of the whole run; later steps keep the last factor.
        min_ratio: The last factor ``r``, in ``[0, 1]``.

    Returns:
        A function of the step, to give ``torch.optim.lr_scheduler.LambdaLR``.

    Raises:
        ValueError: ``total_steps`` is not a positive integer or ``min_ratio`` is outside ``[0, 1]``.
    """
    check_positive_int(total_steps, "total_steps")
    if not 0.0 <= min_ratio <= 1.0:
        raise ValueError(f"min_ratio must lie in [0, 1], got {min_ratio!r}")

    def factor(step: int) -> float:
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps))

    return factor


def cosine_schedule(
    optimizer: torch.optim.Optimizer, total_steps: int, min_lr: float
) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` taking each parameter group from its learning rate to ``min_lr`` over ``total_steps`` steps.

    Call its ``step()`` after every optimiser step. A group whose learning rate is below ``min_lr`` keeps it.

    Args:
        optimizer: The optimiser; each group's current ``lr`` is its initial learning rate.
        total_steps: Steps of the whole run (``epochs * steps_per_epoch``).
        min_lr: The learning rate after the last step.

    Returns:
        The scheduler.

    Raises:
        ValueError: ``total_steps`` is not a positive integer, ``min_lr`` is negative, or a group's learning
            rate is not positive.
    """
    check_positive(min_lr, "min_lr", allow_zero=True)
    factors = []
    for index, group in enumerate(optimizer.param_groups):
        lr = group["lr"]
        if not lr > 0:
            raise ValueError(f"the learning rate of parameter group {index} must be positive, got {lr!r}")
        factors.append(cosine_factor(total_steps, min(1.0, min_lr / lr)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factors)
