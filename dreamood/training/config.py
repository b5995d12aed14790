"""Options of the classifier training loop, and the per-epoch record it returns."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dreamood._validation import check_choice, check_positive, check_positive_int
from dreamood.config import COMPILE_MODES

__all__ = ["EpochMetrics", "TrainingConfig", "TrainingResult"]

AMP_DTYPES = ("bf16", "fp16")


@dataclass(frozen=True)
class TrainingConfig:
    """Hyper-parameters and engineering options of :func:`~dreamood.training.train_classifier`.

    The defaults follow the DREAM-OOD paper and its public code: SGD with Nesterov momentum 0.9, weight decay
    5e-4, a cosine learning rate updated every step down to ``min_lr``. The paper trains CIFAR-100 from scratch
    for 200 epochs with ``lr=0.1, beta=2.5`` and fine-tunes ImageNet-100 for 20 epochs with ``lr=0.001,
    beta=1.0`` from a cross-entropy model (``init_checkpoint``).

    Args:
        epochs: Number of epochs.
        lr: Peak learning rate (the first step's).
        beta: Weight of the outlier loss: ``loss = CE + beta * L_ood``.
        momentum: SGD momentum.
        nesterov: Use Nesterov momentum.
        weight_decay: L2 weight decay on every trained parameter (classifier and regulariser).
        min_lr: Learning rate reached by the cosine schedule after the last step.
        ood_start_epoch: Number of epochs trained with cross-entropy alone before the outlier loss starts (VOS
            starts at epoch 40 of 100); a feature sampler still sees every batch from the first epoch on.
        amp: ``None`` (full precision), ``"bf16"`` or ``"fp16"`` autocast; ``"fp16"`` also scales the loss.
        channels_last: Convert the model and 4-D image batches to the channels-last memory format.
        compile: Run the forward pass through ``torch.compile``.
        compile_mode: ``torch.compile``'s ``mode`` with ``compile=True``: ``None`` (its default), ``"default"``,
            ``"reduce-overhead"`` (CUDA graphs), ``"max-autotune"`` or ``"max-autotune-no-cudagraphs"``.
        cudnn_benchmark: Set ``torch.backends.cudnn.benchmark`` (cuDNN times its convolution algorithms and keeps
            the fastest) while :func:`~dreamood.training.train_classifier` runs, and restore the previous value
            afterwards; ``False`` leaves the setting as it is.
        sync_every: Read the step statistics (losses, accuracy counts, label checks) back from the
            device every this many steps (default 10) and at the end of every epoch, so the host does not wait
            for the device at every step; the epoch metrics do not depend on it. A non-finite loss is reported at
            the next read-back and names the first bad step, but by then that step and up to ``sync_every - 1``
            more have updated the model, so its weights in memory may be NaN (the checkpoint on disk is the last
            completed epoch's). ``1`` checks every step before its update. The progress bar moves at read-backs.
        device: Device to train on; ``None``/``"auto"`` picks CUDA when available (under ``torchrun``, the
            process's ``LOCAL_RANK`` GPU).
        seed: Seed of the loop's own randomness (the order of the mixed ID/outlier batch, the feature
            sampler's draws, the ``DistributedSampler`` shuffling). Your loaders' shuffling follows their own
            ``generator`` or, without one, torch's global random state.
        output_dir: Folder for ``checkpoint.pt`` (written atomically after every epoch) and ``metrics.json``
            (the per-epoch history); ``None`` writes nothing.
        resume: Continue from ``output_dir/checkpoint.pt`` when it exists (start from scratch otherwise).
        init_checkpoint: Weights to start from when not resuming: a checkpoint of this loop or a plain model
            state dict (a ``module.`` prefix left by ``DataParallel`` is removed).
        progress: Show a tqdm progress bar with the running loss and accuracy (on rank 0 only).

    Raises:
        ValueError: A number is out of range, ``amp`` or ``compile_mode`` is unknown, ``compile_mode`` is set
            without ``compile=True``, or ``resume`` is set without ``output_dir``.
        TypeError: A count is not an int.
    """

    epochs: int
    lr: float = 0.1
    beta: float = 1.0
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    min_lr: float = 1e-6
    ood_start_epoch: int = 0
    amp: str | None = None
    channels_last: bool = False
    compile: bool = False
    compile_mode: str | None = None
    cudnn_benchmark: bool = False
    sync_every: int = 10
    device: str | None = None
    seed: int = 0
    output_dir: str | os.PathLike[str] | None = None
    resume: bool = False
    init_checkpoint: str | os.PathLike[str] | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        check_positive_int(self.epochs, "epochs")
        check_positive(self.lr, "lr")
        check_positive(self.beta, "beta", allow_zero=True)
        check_positive(self.momentum, "momentum", allow_zero=True)
        check_positive(self.weight_decay, "weight_decay", allow_zero=True)
        check_positive(self.min_lr, "min_lr", allow_zero=True)
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr must not exceed lr, got min_lr={self.min_lr!r} and lr={self.lr!r}")
        if self.nesterov and self.momentum == 0:
            raise ValueError("nesterov=True needs momentum > 0, got momentum=0")
        check_positive_int(self.ood_start_epoch, "ood_start_epoch", allow_zero=True)
        if self.amp is not None:
            check_choice(self.amp, AMP_DTYPES, "amp")
        if self.compile_mode is not None:
            check_choice(self.compile_mode, COMPILE_MODES, "compile_mode")
            if not self.compile:
                raise ValueError(f"compile_mode={self.compile_mode!r} needs compile=True")
        check_positive_int(self.sync_every, "sync_every")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TypeError(f"seed must be an int, got {type(self.seed).__name__} {self.seed!r}")
        if self.resume and self.output_dir is None:
            raise ValueError("resume=True needs output_dir (the folder holding checkpoint.pt)")

    def to_dict(self) -> dict[str, Any]:
        """Return the options as a JSON-serialisable dict (paths as strings).

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
