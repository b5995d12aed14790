"""Datasets, transforms and class-name lists.

- Class names: CIFAR-100 (label order, prompt-friendly), the paper's ImageNet-100 and ImageNet-1k, and the
  authors' per-class injection words, prompt words and prompt templates (:func:`reference_words`).
- ID datasets: CIFAR-100 (torchvision), ImageNet-100 read in place from an ImageNet-1k folder tree;
  :func:`with_transform` gives another view of a loaded set without loading it again.
- OOD test sets with the paper's preprocessing, and the DREAM-ID generalisation sets (ImageNet-A, -V2).
- :class:`GeneratedImageFolder` reads images written by :func:`dreamood.decoding.generation.generate_images`;
  :func:`export_generated` and :func:`outlier_dataset` hand them to other tools (ImageFolder, OpenOOD, pytorch-ood).

Names are resolved lazily so that reading a class list does not import torchvision.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS: dict[str, str] = {
    "CIFAR100_CLASSES": "dreamood.data.classes",
    "IMAGENET1K_CLASSES": "dreamood.data.classes",
    "IMAGENET1K_WNIDS": "dreamood.data.classes",
    "IMAGENET100_CLASSES": "dreamood.data.classes",
    "IMAGENET100_WNIDS": "dreamood.data.classes",
    "REFERENCE_DATASETS": "dreamood.data.classes",
    "ReferenceWords": "dreamood.data.classes",
    "reference_words": "dreamood.data.classes",
    "cifar100": "dreamood.data.datasets",
    "ImageNet100": "dreamood.data.datasets",
    "ImageNetA": "dreamood.data.datasets",
    "ImageNetV2": "dreamood.data.datasets",
    "ImageListDataset": "dreamood.data.datasets",
    "class_folder_dataset": "dreamood.data.datasets",
    "find_images": "dreamood.data.datasets",
    "link_imagenet_subset": "dreamood.data.datasets",
    "with_transform": "dreamood.data.datasets",
    "OODImageFolder": "dreamood.data.ood",
    "OODSetSpec": "dreamood.data.ood",
    "CIFAR100_OOD_SETS": "dreamood.data.ood",
    "IMAGENET100_OOD_SETS": "dreamood.data.ood",
    "ood_test_sets": "dreamood.data.ood",
    "svhn_test": "dreamood.data.ood",
    "get_transform": "dreamood.data.transforms",
    "cifar_train_transform": "dreamood.data.transforms",
    "cifar_test_transform": "dreamood.data.transforms",
    "imagenet_train_transform": "dreamood.data.transforms",
    "imagenet_test_transform": "dreamood.data.transforms",
    "GeneratedImageFolder": "dreamood.data.generated",
    "export_generated": "dreamood.data.export",
    "outlier_dataset": "dreamood.data.export",
}

__all__ = list(_EXPORTS)

if TYPE_CHECKING:
    from dreamood.data.classes import (
        CIFAR100_CLASSES,
        IMAGENET1K_CLASSES,
        IMAGENET1K_WNIDS,
        IMAGENET100_CLASSES,
        IMAGENET100_WNIDS,
        REFERENCE_DATASETS,
        ReferenceWords,
        reference_words,
    )
    from dreamood.data.datasets import (
        ImageListDataset,
        ImageNet100,
        ImageNetA,
        ImageNetV2,
        cifar100,
        class_folder_dataset,
        find_images,
        link_imagenet_subset,
        with_transform,
    )
    from dreamood.data.export import export_generated, outlier_dataset
    from dreamood.data.generated import GeneratedImageFolder
    from dreamood.data.ood import (
        CIFAR100_OOD_SETS,
        IMAGENET100_OOD_SETS,
        OODImageFolder,
        OODSetSpec,
        ood_test_sets,
        svhn_test,
    )
    from dreamood.data.transforms import (
        cifar_test_transform,
        cifar_train_transform,
        get_transform,
        imagenet_test_transform,
        imagenet_train_transform,
    )


def __getattr__(name: str) -> Any:
    module_name = _EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module 'dreamood.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
