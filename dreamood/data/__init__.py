"""Data helpers: bundled class-name lists for CIFAR-100, the paper's ImageNet-100 and ImageNet-1k."""

from dreamood.data.classes import (
    CIFAR100_CLASSES,
    IMAGENET1K_CLASSES,
    IMAGENET1K_WNIDS,
    IMAGENET100_CLASSES,
    IMAGENET100_WNIDS,
)

__all__ = [
    "CIFAR100_CLASSES",
    "IMAGENET1K_CLASSES",
    "IMAGENET1K_WNIDS",
    "IMAGENET100_CLASSES",
    "IMAGENET100_WNIDS",
]
