"""The datasets and networks of a run, built from its configuration: ID and OOD data, transforms, backbones."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch.utils.data import Dataset

from dreamood.config import PipelineConfig

if TYPE_CHECKING:
    from dreamood.models import ResNetFeatures, SmallConvNet

__all__ = [
    "PipelineData",
    "Transform",
    "build_backbone",
    "build_data",
    "class_names_of",
    "image_size_of",
    "normalization_of",
    "small_input_of",
]

#: A data transform: an image in, whatever the next step takes out.
Transform = Callable[[Any], Any]


@dataclass
class PipelineData:
    """The datasets of a run.

    Attributes:
        class_names: Names of the ID classes, indexed by label.
        train: ID training set with the training augmentation (Phase 1 and Phase 3).
        bank: ID training set with the test transform (the feature bank is built without augmentation).
        test: ID test set.
        ood: OOD test sets by name.
        generated_transform: Transform of the generated images when they are read for training.
        generalization: Extra labelled ID test sets (ImageNet-A, ImageNet-V2) whose accuracy DREAM-ID reports.
        raw_train: The ID training images before augmentation and normalisation (RGB PIL images of the ID size, or
            tensors in ``[0, 1]``), with labels; the augmentation baselines augment these and then apply
            ``generated_transform``.
    """

    class_names: list[str]
    train: Dataset[Any]
    bank: Dataset[Any]
    test: Dataset[Any]
    ood: dict[str, Dataset[Any]]
    generated_transform: Transform | None = None
    generalization: dict[str, Dataset[Any]] = field(default_factory=dict)
    raw_train: Dataset[Any] | None = None


def image_size_of(config: PipelineConfig) -> int:
    """The side of the run's ID images: ``data.image_size``, else 224 for ImageNet-100 and 32 otherwise."""
    return config.data.image_size or (224 if config.benchmark == "imagenet100" else 32)


def small_input_of(config: PipelineConfig) -> bool:
    """Whether the ResNets of the run take the 3x3 stride-1 stem of small images (sides up to 64)."""
    return image_size_of(config) <= 64


def class_names_of(config: PipelineConfig) -> list[str]:
    """The ID class names of a configuration, without loading any dataset.

    Args:
        config: The run's configuration.

    Returns:
        ``data.class_names`` when set; else the benchmark's bundled list (CIFAR-100 in label order, the paper's
        ImageNet-100 in the paper's order); for ``folder``, the sorted class folder names of ``data.root/train``
        with underscores read as spaces.

    Raises:
        FileNotFoundError: For ``folder``, ``data.root/train`` is missing.
    """
    from dreamood.data.classes import CIFAR100_CLASSES, IMAGENET100_CLASSES

    if config.data.class_names is not None:
        return list(config.data.class_names)
    if config.benchmark == "cifar100":
        return list(CIFAR100_CLASSES)
    if config.benchmark == "imagenet100":
        return list(IMAGENET100_CLASSES)
    folder = Path(config.data.root).expanduser() / "train"
    if not folder.is_dir():
        raise FileNotFoundError(f"class folder root not found: {folder} (expected data.root/train/<class>/...)")
    return [entry.name.replace("_", " ") for entry in sorted(folder.iterdir()) if entry.is_dir()]


def build_data(config: PipelineConfig) -> PipelineData:
    """Build the datasets of ``config`` from disk, with the paper's transforms.

    Args:
        config: The run's configuration (``data`` section and ``benchmark``).

    Returns:
        The datasets.

    Raises:
        FileNotFoundError: A dataset folder or file is missing (the message names the expected layout).
        ValueError: A dataset is malformed, or the class names do not match the data.
    """
    from dreamood.data.datasets import (
        ImageNet100,
        ImageNetA,
        ImageNetV2,
        cifar100,
        class_folder_dataset,
        with_transform,
    )
    from dreamood.data.ood import ood_test_sets
    from dreamood.data.transforms import get_transform

    data, benchmark = config.data, config.benchmark
    names = class_names_of(config)
    train_t, test_t = (get_transform(benchmark, split, image_size=data.image_size) for split in ("train", "test"))
    generated_t = get_transform(benchmark, "generated", image_size=data.image_size)
    raw_t = _raw_transform(config)
    root = Path(data.root).expanduser()
    generalization: dict[str, Dataset[Any]] = {}
    if benchmark == "cifar100":
        train = cifar100(root, True, train_t, download=data.download)
        test = cifar100(root, False, test_t)
    elif benchmark == "imagenet100":
        train = ImageNet100(root, "train", train_t)
        test = ImageNet100(root, "val", test_t)
        if data.imagenet_a is not None:
            generalization["ImageNet-A"] = ImageNetA(data.imagenet_a, test_t)
        if data.imagenet_v2 is not None:
            generalization["ImageNet-V2"] = ImageNetV2(data.imagenet_v2, test_t)
    else:
        train = class_folder_dataset(root / "train", train_t)
        test = class_folder_dataset(root / "test", test_t, classes=train.classes)
    # The plain and the raw views share the training images (CIFAR-100's 150 MB array is loaded once).
    bank, raw = with_transform(train, test_t), with_transform(train, raw_t)
    if len(names) != len(getattr(train, "classes", names)):
        raise ValueError(f"data.class_names has {len(names)} names but the training set has {len(train.classes)}")
    ood = ood_test_sets(benchmark, data.ood_root, test_t, names=data.ood_sets, paths=data.ood_paths)
    return PipelineData(names, train, bank, test, ood, generated_t, generalization, raw_train=raw)


def normalization_of(benchmark: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The per-channel mean and standard deviation the benchmark's transforms normalise with."""
    from dreamood.data.transforms import CIFAR_MEAN, CIFAR_STD, IMAGENET_MEAN, IMAGENET_STD

    return (CIFAR_MEAN, CIFAR_STD) if benchmark == "cifar100" else (IMAGENET_MEAN, IMAGENET_STD)


def _rgb(image: Any) -> Any:
    return image.convert("RGB")


def _raw_transform(config: PipelineConfig) -> Transform:
    """RGB, resized and center-cropped to the ID size: the images the augmentation baselines start from."""
    import torchvision.transforms as T

    size = image_size_of(config)
    composed: Transform = T.Compose([_rgb, T.Resize(size), T.CenterCrop(size)])
    return composed


def build_backbone(name: str, *, small_input: bool, seed: int | None = None) -> ResNetFeatures | SmallConvNet:
    """A feature extractor with a ``feature_dim`` attribute.

    Args:
        name: ``"resnet18"``, ``"resnet34"``, ``"resnet50"`` or ``"small"`` (:class:`~dreamood.models.SmallConvNet`
            with 3 input channels and 64 features).
        small_input: Use the 3x3 stride-1 stem of the ResNets (32x32 images).
        seed: Seed of the weight initialisation.

    Returns:
        The backbone, mapping images to ``(N, feature_dim)``.

    Raises:
        ValueError: ``name`` is unknown.
    """
    from dreamood.models import SmallConvNet, resnet18, resnet34, resnet50

    factories = {"resnet18": resnet18, "resnet34": resnet34, "resnet50": resnet50}
    if name == "small":
        return SmallConvNet(3, 64, width=16, seed=seed)
    if name not in factories:
        raise ValueError(f"backbone must be one of {', '.join([*factories, 'small'])}, got {name!r}")
    return factories[name](small_input=small_input, seed=seed)
