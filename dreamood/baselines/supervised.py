"""Cross-entropy training on ID batches plus extra labelled images: a thin wrapper over the shared loop.

:func:`~dreamood.training.train_classifier` takes everything these baselines need: a weight-decay exemption
(``no_weight_decay``; GODIN's similarity weights, Hsu et al., CVPR 2020) and target distributions as labels
(CutMix's mixed labels, Yun et al., ICCV 2019). :func:`train_supervised` keeps its older name and signature.
"""

from __future__ import annotations

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
    config: TrainingConfig | None = None,
    *,
    synthetic_id_loader: Iterable[Any] | None = None,
    no_weight_decay: Iterable[nn.Parameter] = (),
    **options: Any,
) -> TrainingResult:
    """Train ``model`` in place with cross-entropy on ID batches and, optionally, extra labelled images.

    The same as ``train_classifier(model, id_loader, config, synthetic_id_loader=synthetic_id_loader,
    no_weight_decay=no_weight_decay, **options)``
    (:func:`~dreamood.training.train_classifier`, without outliers): a step concatenates an ID batch with the
    next batch of ``synthetic_id_loader`` (cycled, restarted every epoch) and minimises the mean cross-entropy
    over all of them; labels may be integers or target distributions such as CutMix's
    (:func:`~dreamood.training.soft_cross_entropy`). The optimiser is SGD with the config's momentum, Nesterov
    flag and weight decay, except for the parameters in ``no_weight_decay``, with a cosine learning rate
    updated every step. Every option of :class:`~dreamood.training.TrainingConfig` applies (AMP,
    ``torch.compile``, channels-last, checkpoints in ``output_dir``, ``resume``, ``torchrun``).

    Args:
        model: Classifier mapping images to logits ``(N, C)``.
        id_loader: ``(images, labels)`` batches of the ID training set; must have a length.
        config: The options; ``None`` builds one from ``options``.
        synthetic_id_loader: Extra ``(images, labels)`` batches trained on together with each ID batch.
        no_weight_decay: Parameters of ``model`` trained without weight decay.
        **options: Fields of :class:`~dreamood.training.TrainingConfig` overriding ``config``'s.

    Returns:
        The per-epoch history (``ood_loss`` is ``None``; ``accuracy`` is measured on the ID images against the
        label or, for target distributions, their most likely class) and the paths written.

    Raises:
        TypeError: An argument or a batch has the wrong type, or an option is unknown.
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
        **options,
    )
