"""A plain supervised training loop for the baselines that the shared loop cannot express yet.

:func:`~dreamood.training.train_classifier` applies one weight decay to every parameter and takes integer labels
only. GODIN trains its similarity weights without weight decay (Hsu et al., CVPR 2020) and CutMix trains on
mixed (soft) labels (Yun et al., ICCV 2019), so both train here. Everything else matches the shared loop:
:class:`~dreamood.training.TrainingConfig` holds the options, SGD with (Nesterov) momentum, a cosine learning
rate updated every step down to ``min_lr``, and the per-epoch :class:`~dreamood.training.EpochMetrics`. The
engineering options of the shared loop (AMP, ``torch.compile``, channels-last, checkpoints, resuming,
``torchrun``) are not available here and are rejected when set.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import fields, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dreamood._utils import progress, resolve_device
from dreamood.errors import NonFiniteError
from dreamood.training.config import EpochMetrics, TrainingConfig, TrainingResult

__all__ = ["soft_cross_entropy", "train_supervised"]

# Options of TrainingConfig this loop does not implement; each must keep its default.
_UNSUPPORTED = ("beta", "ood_start_epoch", "amp", "channels_last", "compile", "output_dir", "resume", "init_checkpoint")


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
    _check_targets(targets, logits.shape[0], logits.shape[1], "targets")
    if targets.dim() == 1:
        return F.cross_entropy(logits, targets)
    return -(targets.to(logits.dtype) * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


def _check_targets(targets: Tensor, rows: int, num_classes: int, name: str) -> None:
    """Raise unless ``targets`` are ``rows`` labels in ``[0, num_classes)`` or ``rows`` distributions over them."""
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
        sums = targets.double().sum(dim=1)
        if bool((targets < 0).any()) or not bool(torch.allclose(sums, torch.ones_like(sums), atol=1e-4)):
            raise ValueError(f"{name} rows must be probability distributions (non-negative, summing to 1)")
        return
    raise TypeError(
        f"{name} must be integer labels (N,) or target distributions (N, C), got dtype {targets.dtype} and shape "
        f"{tuple(targets.shape)}"
    )


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

    A step concatenates an ID batch with the next batch of ``synthetic_id_loader`` (cycled, restarted every
    epoch; augmented or generated images appended to the training set), runs them through the model in one
    forward pass and minimises the mean cross-entropy over all of them (:func:`soft_cross_entropy`, so labels
    may be integers or target distributions such as CutMix's). The optimiser is SGD with the config's momentum,
    Nesterov flag and weight decay, except for the parameters in ``no_weight_decay`` (GODIN's similarity
    weights), and the learning rate follows ``min_lr + (lr - min_lr) * (1 + cos(pi * t / T)) / 2`` at step
    ``t`` of ``T``.

    Args:
        model: Classifier mapping images to logits ``(N, C)``.
        id_loader: ``(images, labels)`` batches of the ID training set; must have a length.
        config: The options; ``None`` builds one from ``options``.
        synthetic_id_loader: Extra ``(images, labels)`` batches trained on together with each ID batch.
        no_weight_decay: Parameters of ``model`` trained without weight decay.
        **options: Fields of :class:`~dreamood.training.TrainingConfig` overriding ``config``'s.

    Returns:
        The per-epoch history (``ood_loss`` is ``None``; ``accuracy`` is measured on the ID images against the
        label or, for target distributions, their most likely class). Nothing is written to disk.

    Raises:
        TypeError: An argument or a batch has the wrong type, or an option is unknown.
        ValueError: An unsupported option is set (``amp``, ``compile``, ``channels_last``, ``output_dir``,
            ``resume``, ``init_checkpoint``, ``beta``, ``ood_start_epoch``), ``no_weight_decay`` holds a
            parameter that is not in ``model``, a loader is empty, or labels do not fit the model's outputs.
        NonFiniteError: The loss became NaN or infinite; the message names the epoch and step.
    """
    config = _make_config(config, options)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for name, loader in (("id_loader", id_loader), ("synthetic_id_loader", synthetic_id_loader)):
        if loader is not None and not isinstance(loader, Iterable):
            raise TypeError(f"{name} must be an iterable of batches (e.g. a DataLoader), got {type(loader).__name__}")
    try:
        steps_per_epoch = len(id_loader)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError("id_loader must have a length (e.g. a DataLoader over a map-style dataset)") from None
    if steps_per_epoch == 0:
        raise ValueError("id_loader is empty: it yields no batch")

    device = resolve_device(config.device)
    model.to(device)
    optimizer = torch.optim.SGD(
        _parameter_groups(model, no_weight_decay),
        lr=config.lr,
        momentum=config.momentum,
        nesterov=config.nesterov,
        weight_decay=config.weight_decay,
    )
    total_steps = config.epochs * steps_per_epoch
    min_ratio = config.min_lr / config.lr
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda t: min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * t / total_steps))
    )

    history: list[EpochMetrics] = []
    for epoch in range(config.epochs):
        model.train()
        start = time.perf_counter()
        synthetic = None if synthetic_id_loader is None else _cycle(synthetic_id_loader, "synthetic_id_loader")
        loss_sum = correct = seen = 0.0
        steps = 0
        lr = float(optimizer.param_groups[0]["lr"])
        desc = f"epoch {epoch + 1}/{config.epochs}"
        for step, batch in enumerate(progress(id_loader, enabled=config.progress, desc=desc, total=steps_per_epoch)):
            lr = float(optimizer.param_groups[0]["lr"])
            images, labels = _labelled_batch(batch, "id_loader")
            parts, targets = [images], [labels]
            if synthetic is not None:
                extra_images, extra_labels = _labelled_batch(next(synthetic), "synthetic_id_loader")
                if extra_images.shape[1:] != images.shape[1:] or extra_images.dtype != images.dtype:
                    raise ValueError(
                        f"synthetic_id_loader yielded images of shape {tuple(extra_images.shape[1:])} and dtype "
                        f"{extra_images.dtype}, but id_loader yields {tuple(images.shape[1:])} and {images.dtype}"
                    )
                parts.append(extra_images)
                targets.append(extra_labels)
            logits = model(torch.cat(parts).to(device, non_blocking=True))
            loss, n_correct = _loss_and_correct(logits, targets, images.shape[0], device)
            value = float(loss.detach())
            if not math.isfinite(value):
                raise NonFiniteError(
                    f"the training loss is {value} at epoch {epoch + 1}/{config.epochs}, step "
                    f"{step + 1}/{steps_per_epoch}; check the inputs for NaN or infinity or lower the learning rate"
                )
            optimizer.zero_grad(set_to_none=True)
            torch.autograd.backward(loss)
            optimizer.step()
            scheduler.step()
            steps += 1
            loss_sum += value
            correct += n_correct
            seen += images.shape[0]
        history.append(
            EpochMetrics(
                epoch=epoch + 1,
                loss=loss_sum / max(steps, 1),
                ce_loss=loss_sum / max(steps, 1),
                ood_loss=None,
                accuracy=correct / max(seen, 1.0),
                lr=lr,
                steps=steps,
                ood_steps=0,
                seconds=time.perf_counter() - start,
            )
        )
    optimizer.zero_grad(set_to_none=True)
    return TrainingResult(history=history)


def _make_config(config: TrainingConfig | None, options: dict[str, Any]) -> TrainingConfig:
    if config is None:
        config = TrainingConfig(**options)
    elif not isinstance(config, TrainingConfig):
        raise TypeError(f"config must be a TrainingConfig, got {type(config).__name__}")
    elif options:
        config = replace(config, **options)
    defaults = {f.name: f.default for f in fields(TrainingConfig)}
    changed = [name for name in _UNSUPPORTED if getattr(config, name) != defaults[name]]
    if changed:
        raise ValueError(
            f"train_supervised does not implement {', '.join(changed)}; leave them at their defaults "
            "(use dreamood.training.train_classifier for outlier losses, AMP, checkpoints and torchrun)"
        )
    return config


def _parameter_groups(model: nn.Module, no_weight_decay: Iterable[nn.Parameter]) -> list[dict[str, Any]]:
    excluded = {id(p) for p in no_weight_decay}
    parameters = list(model.parameters())
    unknown = excluded - {id(p) for p in parameters}
    if unknown:
        raise ValueError(f"no_weight_decay holds {len(unknown)} parameter(s) that are not parameters of model")
    groups: list[dict[str, Any]] = [{"params": [p for p in parameters if id(p) not in excluded]}]
    if excluded:
        groups.append({"params": [p for p in parameters if id(p) in excluded], "weight_decay": 0.0})
    return groups


def _cycle(loader: Iterable[Any], name: str) -> Iterator[Any]:
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise ValueError(f"{name} yielded no batch")


def _labelled_batch(batch: Any, name: str) -> tuple[Tensor, Tensor]:
    if not (isinstance(batch, (tuple, list)) and len(batch) >= 2 and all(isinstance(b, Tensor) for b in batch[:2])):
        raise TypeError(f"{name} must yield (images, labels) tensor pairs, got a {type(batch).__name__}")
    images, labels = batch[0], batch[1]
    if labels.dim() == 0 or labels.shape[0] != images.shape[0]:
        raise ValueError(f"{name} yielded {images.shape[0]} images but labels of shape {tuple(labels.shape)}")
    return images, labels


def _loss_and_correct(logits: Tensor, targets: list[Tensor], n_id: int, device: torch.device) -> tuple[Tensor, float]:
    """Mean cross-entropy over every labelled image, and the number of ID images classified correctly."""
    if logits.dim() != 2:
        raise ValueError(f"model must return logits of shape (N, C), got shape {tuple(logits.shape)}")
    total = logits.new_zeros(())
    start = 0
    for index, target in enumerate(targets):
        name = "id_loader labels" if index == 0 else "synthetic_id_loader labels"
        part = logits[start : start + target.shape[0]]
        _check_targets(target, part.shape[0], logits.shape[1], name)
        total = total + soft_cross_entropy(part, target.to(device)) * part.shape[0]
        start += target.shape[0]
    id_target = targets[0].to(device)
    id_label = id_target if id_target.dim() == 1 else id_target.argmax(dim=1)
    n_correct = float((logits[:n_id].argmax(dim=1) == id_label).sum())
    return total / logits.shape[0], n_correct
