"""What a generalisation table needs: top-1 accuracy of any classifier, and a shifted copy of a test set.

DREAM-ID (Du et al., NeurIPS 2023, Tables 4 and 5) reports ID accuracy on the ID test set and on shifted test
sets (ImageNet-A, ImageNet-V2). For small data without such sets, :func:`rotate_images` makes a covariate-shifted
copy of the test images (each rotated by a seeded random angle).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sized
from typing import Any

import torch
from torch import Tensor, nn

from dreamood._utils import DeviceLike, progress, resolve_device
from dreamood._validation import as_tensor, check_finite, check_floating, check_positive, check_positive_int

__all__ = ["classification_accuracy", "rotate_images"]


def rotate_images(images: Tensor, max_degrees: float = 15.0, *, seed: int = 0) -> Tensor:
    """Rotate each image about its centre by an angle drawn uniformly from ``[-max_degrees, max_degrees]``.

    Bilinear interpolation, corners filled with 0, through ``torchvision.transforms.v2.functional.rotate``.
    Angles come from a ``torch.Generator`` seeded with ``seed`` (image ``i`` gets the ``i``-th draw).

    Args:
        images: Images ``(N, C, H, W)``, floating point.
        max_degrees: Largest absolute angle, in degrees.
        seed: Seed of the angles.

    Returns:
        The rotated images, same shape and dtype.

    Raises:
        TypeError: ``images`` is not floating point.
        ValueError: ``images`` is not 4-D or ``max_degrees`` is negative.
    """
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    batch = as_tensor(images, "images")
    check_floating(batch, "images")
    if batch.dim() != 4:
        raise ValueError(f"images must be (N, C, H, W), got shape {tuple(batch.shape)}")
    check_positive(max_degrees, "max_degrees", allow_zero=True)
    check_positive_int(seed, "seed", allow_zero=True)
    generator = torch.Generator().manual_seed(seed)
    angles = (torch.rand(batch.shape[0], generator=generator, dtype=torch.float64) * 2 - 1) * max_degrees
    rotated = [
        TF.rotate(image, float(angle), interpolation=InterpolationMode.BILINEAR, fill=0.0)
        for image, angle in zip(batch, angles)
    ]
    return torch.stack(rotated) if rotated else batch.clone()


def classification_accuracy(
    model: Callable[[Tensor], Tensor],
    loader: Iterable[Any],
    *,
    device: DeviceLike = None,
    progress_bar: bool = True,
) -> float:
    """Top-1 accuracy of ``model`` over the ``(images, labels)`` batches of ``loader``.

    Modules are put in eval mode for the pass (every submodule's flag is restored afterwards) and run under
    ``torch.no_grad()``; test-time adaptation such as :class:`~dreamood.baselines.MEMO` enables gradients itself.

    Args:
        model: Maps images to logits ``(N, C)``: an ``nn.Module`` or any callable (e.g. a ``MEMO``).
        loader: Yields ``(images, labels)`` batches, integer labels in ``[0, C)``.
        device: Where the images go (``None``: the device of the model's first parameter, else CUDA when
            available).
        progress_bar: Show a progress bar over the batches.

    Returns:
        The fraction of correctly classified images.

    Raises:
        TypeError: ``model`` is not callable or a batch is not ``(images, labels)``.
        ValueError: The loader is empty, or logits and labels do not fit together.
        NonFiniteError: The model returned NaN or infinite logits.
    """
    if not callable(model):
        raise TypeError(f"model must be callable (images -> logits), got {type(model).__name__}")
    target_device = _device(model, device)
    total = len(loader) if isinstance(loader, Sized) else None
    correct = seen = 0
    with torch.no_grad(), _eval_mode(model):
        for batch in progress(loader, enabled=progress_bar, desc="accuracy", total=total):
            if not (isinstance(batch, (tuple, list)) and len(batch) >= 2 and isinstance(batch[0], Tensor)):
                raise TypeError(f"loader must yield (images, labels) batches, got a {type(batch).__name__}")
            images, labels = batch[0], as_tensor(batch[1], "labels")
            logits = model(images.to(target_device))
            if not isinstance(logits, Tensor) or logits.dim() != 2 or logits.shape[0] != images.shape[0]:
                shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
                raise ValueError(f"model must return logits (N, C) with N = {images.shape[0]}, got {shape}")
            check_finite(logits, "model output")
            if labels.dim() != 1 or labels.shape[0] != images.shape[0] or labels.is_floating_point():
                raise ValueError(
                    f"labels must be {images.shape[0]} integers, got dtype {labels.dtype}, shape {tuple(labels.shape)}"
                )
            if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= logits.shape[1]):
                raise ValueError(f"labels must lie in [0, {logits.shape[1]}) for logits with {logits.shape[1]} columns")
            correct += int((logits.argmax(dim=1).cpu() == labels.cpu()).sum())
            seen += images.shape[0]
    if seen == 0:
        raise ValueError("loader yielded no image")
    return correct / seen


def _device(model: Any, device: DeviceLike) -> torch.device:
    if device is not None:
        return resolve_device(device)
    modules = [model] if isinstance(model, nn.Module) else [getattr(model, "model", None)]
    for module in modules:
        if isinstance(module, nn.Module):
            for tensor in (*module.parameters(), *module.buffers()):
                return tensor.device
    return resolve_device(None)


@contextlib.contextmanager
def _eval_mode(model: Any) -> Iterator[None]:
    flags = [(m, m.training) for m in model.modules()] if isinstance(model, nn.Module) else []
    if isinstance(model, nn.Module):
        model.eval()
    try:
        yield
    finally:
        for module, training in flags:
            module.training = training
