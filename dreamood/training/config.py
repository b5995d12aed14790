"""Options of the classifier training loop, and the per-epoch record it returns.

:class:`TrainingConfig` is defined in :mod:`dreamood.config` (next to the run configuration's ``[training]``
section, :class:`~dreamood.config.TrainConfig`, which extends it) and re-exported here.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dreamood.config import TrainingConfig

__all__ = ["EpochMetrics", "TrainingConfig", "TrainingResult"]


@dataclass(frozen=True)
class _LoopSettings(TrainingConfig):
    """A :class:`TrainingConfig` with the run-time arguments of one ``train_classifier`` call.

    What the loop reads, and what its checkpoints and ``metrics.json`` record under ``"config"``.
    """

    device: str | None = None
    seed: int = 0
    output_dir: str | os.PathLike[str] | None = None
    resume: bool = False
    init_checkpoint: str | os.PathLike[str] | None = None
    progress: bool = True
    fingerprint: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Return the settings as a JSON-serialisable dict (paths as strings).

        Returns:
            A dict mapping each field name to its value.
        """
        data = asdict(self)
        for key in ("output_dir", "init_checkpoint"):
            if data[key] is not None:
                data[key] = str(data[key])
        return data


@dataclass(frozen=True)
class EpochMetrics:
    """What one training epoch measured (averaged over every process under ``torchrun``).

    Attributes:
        epoch: Epoch number, starting at 1.
        loss: Mean over the epoch's steps of the total loss ``CE + beta * L_ood``.
        ce_loss: Mean cross-entropy on the labelled in-distribution samples.
        ood_loss: Mean outlier loss ``L_ood`` over the steps that had outliers, or ``None`` if none had.
        accuracy: Top-1 training accuracy on the real in-distribution samples, as a fraction.
        lr: Learning rate of the epoch's last step.
        steps: Number of optimisation steps.
        ood_steps: Number of steps that included the outlier loss.
        seconds: Wall-clock duration of the epoch.
    """

    epoch: int
    loss: float
    ce_loss: float
    ood_loss: float | None
    accuracy: float
    lr: float
    steps: int
    ood_steps: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        """Return the fields as a JSON-serialisable dict.

        Returns:
            A dict mapping each field name to its value.
        """
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EpochMetrics:
        """Rebuild the record from :meth:`to_dict` output.

        Args:
            data: A dict as returned by :meth:`to_dict`.

        Returns:
            The record.
        """
        return cls(**data)


@dataclass(frozen=True)
class TrainingResult:
    """The outcome of :func:`~dreamood.training.train_classifier`; the model itself is trained in place.

    Attributes:
        history: One record per epoch, including epochs completed before a resume.
        checkpoint_path: The last checkpoint written, or ``None`` without ``output_dir``.
        metrics_path: The JSON history written, or ``None`` without ``output_dir``.
    """

    history: list[EpochMetrics] = field(default_factory=list)
    checkpoint_path: Path | None = None
    metrics_path: Path | None = None

    @property
    def final(self) -> EpochMetrics:
        """The last epoch's record.

        Raises:
            ValueError: The history is empty.
        """
        if not self.history:
            raise ValueError("the training history is empty")
        return self.history[-1]
