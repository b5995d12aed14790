"""Cross-entropy training on ID batches plus extra labelled images: a thin wrapper over the shared loop.

:func:`~dreamood.training.train_classifier` takes everything these baselines need: a weight-decay exemption
(``no_weight_decay``; GODIN's similarity weights, Hsu et al., CVPR 2020) and target distributions as labels
(CutMix's mixed labels, Yun et al., ICCV 2019). :func:`train_supervised` keeps its older name and signature.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

from torch import nn

from dreamood.training.config import TrainingConfig, TrainingResult
from dreamood.training.loop import train_classifier
from dreamood.training.losses import soft_cross_entropy

__all__ = ["soft_cross_entropy", "train_supervised"]


def train_supervised(
    model: nn.Module,
    id_loader: Iterable[Any],
    config: TrainingConfig,
    *,
    synthetic_id_loader: Iterable[Any] | None = None,
    no_weight_decay: Iterable[nn.Parameter] = (),
    device: str | None = None,
    seed: int = 0,
    output_dir: str | os.PathLike[str] | None = None,
    resume: bool = False,
    init_checkpoint: str | os.PathLike[str] | None = None,
    progress: bool = True,
    fingerprint: str | None = None,
) -> TrainingResult:
    """Train ``model`` in place with cross-entropy on ID batches and, optionally, extra labelled images.

    The same as ``train_classifier(model, id_loader, config, synthetic_id_loader=synthetic_id_loader,
    no_weight_decay=no_weight_decay, device=device, ...)``
    (:func:`~dreamood.training.train_classifier`, without outliers): a step concatenates an ID batch with the
    next batch of ``synthetic_id_loader`` (cycled, restarted every epoch) and minimises the mean cross-entropy
    over all of them; labels may be integers or target distributions such as CutMix's
    (:func:`~dreamood.training.soft_cross_entropy`). The optimiser is SGD with the config's momentum, Nesterov
    flag and weight decay, except for the parameters in ``no_weight_decay``, with a cosine learning rate
    updated every step. Every option of :class:`~dreamood.training.TrainingConfig` applies (AMP,
    ``torch.compile``, channels-last), and so do checkpoints in ``output_dir``, ``resume`` and ``torchrun``.

    Args:
        model: Classifier mapping images to logits ``(N, C)``.
        id_loader: ``(images, labels)`` batches of the ID training set; must have a length.
        config: The hyper-parameters (:class:`~dreamood.training.TrainingConfig`).
        synthetic_id_loader: Extra ``(images, labels)`` batches trained on together with each ID batch.
        no_weight_decay: Parameters of ``model`` trained without weight decay.
        device: Device to train on; ``None``/``"auto"`` picks CUDA when available.
        seed: Seed of the training loop's own randomness.
        output_dir: Folder for ``checkpoint.pt`` and ``metrics.json``; ``None`` writes nothing.
        resume: Continue from ``output_dir/checkpoint.pt`` when it exists.
        init_checkpoint: Weights to start from when not resuming.
        progress: Show a progress bar.
        fingerprint: What identifies the training's data and settings; a checkpoint written with another one
            is not resumed (see :func:`~dreamood.training.train_classifier`).

    Returns:
        The per-epoch history (``ood_loss`` is ``None``; ``accuracy`` is measured on the ID images against the
        label or, for target distributions, their most likely class) and the paths written.

    Raises:
        TypeError: An argument or a batch has the wrong type.
        ValueError: ``no_weight_decay`` holds a parameter that is not in ``model``, a loader is empty, or labels
            do not fit the model's outputs.
        NonFiniteError: The loss became NaN or infinite; the message names the epoch and step.
    """
    return train_classifier(
        model,
        id_loader,
        config,
        synthetic_id_loader=synthetic_id_loader,
        no_weight_decay=no_weight_decay,
        device=device,
        seed=seed,
        output_dir=output_dir,
        resume=resume,
        init_checkpoint=init_checkpoint,
        progress=progress,
        fingerprint=fingerprint,
    )
