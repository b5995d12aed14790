"""The paper's image preprocessing for CIFAR-100 and ImageNet-100, for training, testing and OOD test sets.

DREAM-OOD (Du et al., NeurIPS 2023) follows the VOS/NPOS code: CIFAR images are randomly cropped (32, padding 4)
and flipped for training; ImageNet images are randomly resized-cropped to 224 and flipped for training, and
resized to 256 then center-cropped to 224 for testing. OOD test images go through the ID test transform (for
CIFAR, resized and center-cropped to 32 first, since Textures and Places365 are larger). Generated images are
resized to the ID resolution before the training augmentation, so a 256x256 CIFAR outlier becomes a 32x32
image rather than a random 32x32 patch of it.

torchvision is imported inside each function, so importing this module is cheap.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from dreamood._validation import check_choice, check_positive_int

__all__ = [
    "BENCHMARKS",
    "CIFAR_MEAN",
    "CIFAR_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "SPLITS",
    "cifar_test_transform",
    "cifar_train_transform",
    "get_transform",
    "imagenet_test_transform",
    "imagenet_train_transform",
]

#: Per-channel mean of CIFAR images in ``[0, 1]`` used by the VOS / NPOS / DREAM-OOD code.
CIFAR_MEAN: tuple[float, float, float] = (125.3 / 255, 123.0 / 255, 113.9 / 255)
#: Per-channel standard deviation of CIFAR images used by the VOS / NPOS / DREAM-OOD code.
CIFAR_STD: tuple[float, float, float] = (63.0 / 255, 62.1 / 255, 66.7 / 255)
#: The usual ImageNet per-channel mean.
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
#: The usual ImageNet per-channel standard deviation.
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

#: Benchmarks with a transform recipe: the paper's two and ``"folder"`` (any image-folder dataset, CIFAR-style
#: augmentation at a chosen size with ImageNet normalisation).
BENCHMARKS: tuple[str, ...] = ("cifar100", "imagenet100", "folder")
#: What a transform is for: ID training, ID test and OOD test, or generated images used for training.
SPLITS: tuple[str, ...] = ("train", "test", "generated")

Transform = Callable[[Any], Any]


def _finish(steps: list[Any], mean: tuple[float, ...], std: tuple[float, ...], normalize: bool) -> Transform:
    import torchvision.transforms as T

    steps = [_to_rgb, *steps, T.ToTensor()]
    if normalize:
        steps.append(T.Normalize(mean, std))
    composed: Transform = T.Compose(steps)
    return composed


def _to_rgb(image: Any) -> Any:
    """Convert a PIL image to RGB (grey-scale and RGBA images occur in Textures, iNaturalist and SUN)."""
    return image.convert("RGB") if getattr(image, "mode", "RGB") != "RGB" else image


def cifar_train_transform(
    size: int = 32, *, padding: int = 4, resize: bool = False, normalize: bool = True
) -> Transform:
    """CIFAR training augmentation: random crop ``size`` with ``padding``, horizontal flip, to tensor, normalise.

    Args:
        size: Output side in pixels (32 for CIFAR).
        padding: Zero padding added on each side before the random crop.
        resize: Resize the image to ``size`` first (for generated images, which are larger than 32x32).
        normalize: Normalise with :data:`CIFAR_MEAN` / :data:`CIFAR_STD`.

    Returns:
        A callable mapping a PIL image to a float tensor ``(3, size, size)``.
    """
    import torchvision.transforms as T

    check_positive_int(size, "size")
    check_positive_int(padding, "padding", allow_zero=True)
    steps: list[Any] = [T.Resize(size), T.CenterCrop(size)] if resize else []
    steps += [T.RandomCrop(size, padding=padding), T.RandomHorizontalFlip()]
    return _finish(steps, CIFAR_MEAN, CIFAR_STD, normalize)


def cifar_test_transform(size: int = 32, *, normalize: bool = True) -> Transform:
    """CIFAR test transform, also used for the CIFAR-100 OOD sets: resize and center-crop to ``size``, normalise.

    On 32x32 images (CIFAR, SVHN, LSUN-C, iSUN) the resize and crop leave the image unchanged.

    Args:
        size: Output side in pixels.
        normalize: Normalise with :data:`CIFAR_MEAN` / :data:`CIFAR_STD`.

    Returns:
        A callable mapping a PIL image to a float tensor ``(3, size, size)``.
    """
    import torchvision.transforms as T

    check_positive_int(size, "size")
    return _finish([T.Resize(size), T.CenterCrop(size)], CIFAR_MEAN, CIFAR_STD, normalize)


def imagenet_train_transform(size: int = 224, *, normalize: bool = True) -> Transform:
    """ImageNet training augmentation: random resized crop to ``size``, horizontal flip, to tensor, normalise.

    Args:
        size: Output side in pixels.
        normalize: Normalise with :data:`IMAGENET_MEAN` / :data:`IMAGENET_STD`.

    Returns:
        A callable mapping a PIL image to a float tensor ``(3, size, size)``.
    """
    import torchvision.transforms as T

    check_positive_int(size, "size")
    return _finish([T.RandomResizedCrop(size), T.RandomHorizontalFlip()], IMAGENET_MEAN, IMAGENET_STD, normalize)


def imagenet_test_transform(size: int = 224, *, resize: int = 256, normalize: bool = True) -> Transform:
    """ImageNet test transform, also used for the ImageNet-100 OOD sets: resize ``resize``, center-crop ``size``.

    Args:
        size: Side of the center crop in pixels.
        resize: Length of the shorter side after resizing.
        normalize: Normalise with :data:`IMAGENET_MEAN` / :data:`IMAGENET_STD`.

    Returns:
        A callable mapping a PIL image to a float tensor ``(3, size, size)``.

    Raises:
        ValueError: ``size`` is larger than ``resize``.
    """
    import torchvision.transforms as T

    check_positive_int(size, "size")
    check_positive_int(resize, "resize")
    if size > resize:
        raise ValueError(f"size must not exceed resize, got size={size} and resize={resize}")
    return _finish([T.Resize(resize), T.CenterCrop(size)], IMAGENET_MEAN, IMAGENET_STD, normalize)


def get_transform(benchmark: str, split: str, *, image_size: int | None = None, normalize: bool = True) -> Transform:
    """The paper's transform of ``benchmark`` for ``split``.

    ======================  ================================  ====================================
    benchmark               ``"train"`` / ``"generated"``     ``"test"`` (ID test and OOD sets)
    ======================  ================================  ====================================
    ``"cifar100"``          random crop 32 pad 4 + flip       resize 32, center crop 32
    ``"imagenet100"``       random resized crop 224 + flip    resize 256, center crop 224
    ``"folder"``            as CIFAR at ``image_size``        resize + center crop ``image_size``
    ======================  ================================  ====================================

    ``"generated"`` resizes the image to the ID resolution before the CIFAR-style crop (random resized crop
    already rescales ImageNet images).

    Args:
        benchmark: ``"cifar100"``, ``"imagenet100"`` or ``"folder"``.
        split: ``"train"``, ``"test"`` or ``"generated"``.
        image_size: Output side; defaults to 32 for CIFAR-100 and ``"folder"``, 224 for ImageNet-100.
        normalize: Apply the benchmark's mean/std normalisation (ImageNet statistics for ``"folder"``).

    Returns:
        A callable mapping a PIL image to a float tensor ``(3, image_size, image_size)``.

    Raises:
        ValueError: ``benchmark`` or ``split`` is unknown.
    """
    check_choice(benchmark, BENCHMARKS, "benchmark")
    check_choice(split, SPLITS, "split")
    if benchmark == "imagenet100":
        size = 224 if image_size is None else image_size
        if split == "test":
            return imagenet_test_transform(size, resize=max(size, round(size * 256 / 224)), normalize=normalize)
        return imagenet_train_transform(size, normalize=normalize)
    size = 32 if image_size is None else image_size
    if benchmark == "cifar100":
        if split == "test":
            return cifar_test_transform(size, normalize=normalize)
        return cifar_train_transform(size, resize=split == "generated", normalize=normalize)
    import torchvision.transforms as T

    if split == "test":
        return _finish([T.Resize(size), T.CenterCrop(size)], IMAGENET_MEAN, IMAGENET_STD, normalize)
    steps: list[Any] = [T.Resize(size), T.CenterCrop(size)]
    steps += [T.RandomCrop(size, padding=max(1, size // 8)), T.RandomHorizontalFlip()]
    return _finish(steps, IMAGENET_MEAN, IMAGENET_STD, normalize)
