"""Data-augmentation baselines of DREAM-ID (paper Tables 4 and 5), through torchvision's implementations.

DREAM-ID (Du et al., NeurIPS 2023) appends generated inliers to the training set; the paper compares with
appending the same number of augmented copies of training images (Table 4), and with applying the
augmentations directly to the training batches (Table 5):

* RandAugment (Cubuk, Zoph, Shlens, Le, NeurIPS 2020): ``torchvision.transforms.RandAugment``, 2 operations of
  magnitude 9;
* AutoAugment (Cubuk, Zoph, Mane, Vasudevan, Le, CVPR 2019): ``torchvision.transforms.AutoAugment`` with the
  ImageNet policy;
* AugMix (Hendrycks, Mu, Cubuk, Zoph, Gilmer, Lakshminarayanan, ICLR 2020): ``torchvision.transforms.AugMix``
  with 3 chains and Dirichlet/Beta parameter 1;
* CutMix (Yun, Han, Oh, Chun, Choe, Yoo, ICCV 2019): ``torchvision.transforms.v2.CutMix`` with Beta parameter 1,
  applied to every batch (probability 1); its labels are mixtures, target distributions that
  :func:`~dreamood.training.train_classifier` takes as labels.

:class:`AugmentedPool` is the appended set (fixed augmented copies, ``num_per_class`` per class, as many as
DREAM-ID generates); :class:`AugmentedLoader` augments every batch of a loader anew each epoch. Both take image
tensors in ``[0, 1]`` (before any normalisation; the single-image augmentations run on ``uint8`` pixels, as
torchvision's do) and draw their randomness from an explicit seed. For datasets of image files, you can also put
:func:`augmentation_transform` into the dataset's PIL transform, before ``ToTensor`` and ``Normalize``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from dreamood._validation import as_tensor, check_choice, check_positive_int

__all__ = [
    "AUGMENTATIONS",
    "IMAGE_AUGMENTATIONS",
    "AugmentedLoader",
    "AugmentedPool",
    "augment_image",
    "augmentation_transform",
]

#: Every augmentation baseline: the single-image ones and the batch-level CutMix.
AUGMENTATIONS: tuple[str, ...] = ("randaugment", "autoaugment", "augmix", "cutmix")

#: The augmentations that transform one image at a time (:func:`augmentation_transform`).
IMAGE_AUGMENTATIONS: tuple[str, ...] = ("randaugment", "autoaugment", "augmix")

Transform = Callable[[Any], Any]


def augmentation_transform(name: str) -> Transform:
    """The torchvision transform of a single-image augmentation baseline, with the paper's settings.

    Args:
        name: ``"randaugment"`` (2 operations, magnitude 9), ``"autoaugment"`` (ImageNet policy) or ``"augmix"``
            (3 chains, ``alpha = 1``).

    Returns:
        The transform; it takes a PIL image or a ``uint8`` tensor ``(C, H, W)`` and draws from torch's global
        random state (:func:`augment_image` and the classes here seed it explicitly).

    Raises:
        ValueError: ``name`` is not a single-image augmentation (CutMix mixes pairs: see :class:`AugmentedPool`
            and :class:`AugmentedLoader`).
    """
    check_choice(name, IMAGE_AUGMENTATIONS, "name")
    from torchvision import transforms

    if name == "randaugment":
        return transforms.RandAugment(num_ops=2, magnitude=9)  # type: ignore[no-any-return]
    if name == "autoaugment":
        return transforms.AutoAugment(transforms.AutoAugmentPolicy.IMAGENET)  # type: ignore[no-any-return]
    return transforms.AugMix(mixture_width=3, alpha=1.0)  # type: ignore[no-any-return]


def augment_image(image: Tensor, transform: Transform) -> Tensor:
    """Apply a ``uint8`` image transform to a float image in ``[0, 1]`` (or a ``uint8`` image).

    A float image is quantised to ``round(255 x)``, transformed and divided by 255 again; a ``uint8`` image is
    transformed as it is.

    Args:
        image: ``(C, H, W)`` tensor, ``uint8`` or floating point in ``[0, 1]``.
        transform: A transform of ``uint8`` tensors, such as :func:`augmentation_transform`'s.

    Returns:
        The augmented image, in the dtype of ``image``.

    Raises:
        TypeError: ``image`` is neither ``uint8`` nor floating point.
        ValueError: ``image`` is not ``(C, H, W)`` or a float image leaves ``[0, 1]``.
    """
    pixels = _to_uint8(image, "image")
    augmented: Tensor = transform(pixels)
    if image.dtype == torch.uint8:
        return augmented
    return augmented.to(image.dtype) / 255.0


def _to_uint8(image: Tensor, name: str) -> Tensor:
    if not isinstance(image, Tensor) or image.dim() != 3:
        shape = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
        raise ValueError(f"{name} must be an image tensor (C, H, W), got {shape}")
    if image.dtype == torch.uint8:
        return image
    if not image.is_floating_point():
        raise TypeError(f"{name} must be uint8 or floating point in [0, 1], got {image.dtype}")
    low, high = float(image.min()), float(image.max())
    if not (low >= 0.0 and high <= 1.0):
        raise ValueError(
            f"{name} must lie in [0, 1] (augment before normalising), got values from {low:.4g} to {high:.4g}"
        )
    return (image * 255.0).round().to(torch.uint8)


def _as_float_image(image: Any, name: str) -> Tensor:
    """A dataset's image as a float32 ``(C, H, W)`` tensor in ``[0, 1]`` (PIL and ``uint8`` are converted)."""
    if not isinstance(image, Tensor):
        from PIL import Image
        from torchvision.transforms.functional import pil_to_tensor

        if not isinstance(image, Image.Image):
            raise TypeError(f"{name} must be an image tensor or a PIL image, got {type(image).__name__}")
        image = pil_to_tensor(image)
    pixels = _to_uint8(image, name)
    return image.float() if image.is_floating_point() else pixels.float() / 255.0


def _derived_seed(*values: int) -> int:
    import numpy as np

    return int(np.random.SeedSequence(list(values)).generate_state(1, np.uint64)[0] % 2**63)


def _cutmix(images: Tensor, labels: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """torchvision's CutMix (alpha 1) on a batch: image ``i`` gets a box of image ``i - 1``; soft labels."""
    from torchvision.transforms import v2

    mixed, targets = v2.CutMix(num_classes=num_classes, alpha=1.0)(images, labels)
    return mixed, targets


def _dataset_labels(dataset: Any, labels: Any) -> Tensor:
    if labels is None:
        labels = getattr(dataset, "targets", None)
        tensors = getattr(dataset, "tensors", None)
        if labels is None and isinstance(tensors, tuple) and len(tensors) >= 2:
            labels = tensors[1]
        if labels is None:
            raise TypeError(
                f"labels are needed: {type(dataset).__name__} has no targets attribute; pass labels=<one per image>"
            )
    values = as_tensor(labels, "labels")
    if values.dim() != 1 or values.is_floating_point() or values.dtype == torch.bool:
        raise TypeError(f"labels must be one integer per image, got dtype {values.dtype}, shape {tuple(values.shape)}")
    if values.shape[0] != len(dataset):
        raise ValueError(f"labels has {values.shape[0]} entries but the dataset has {len(dataset)} images")
    if values.numel() and int(values.min()) < 0:
        raise ValueError(f"labels must be >= 0, got {int(values.min())}")
    return values.to(torch.int64).cpu()


class AugmentedPool(Dataset[tuple[Tensor, Any]]):
    """A fixed set of augmented copies of training images, ``num_per_class`` per class (paper Table 4).

    Item ``i`` is an augmented copy of source image ``sources[i]``: the classes come in label order, and each
    class's images are visited in a seeded random order (repeated when ``num_per_class`` exceeds the class
    size). Item ``i`` is always the same image: its augmentation is drawn from its own seed. For CutMix the
    source image gets a box of a seeded random partner image from the whole dataset, and the label is
    torchvision's mixture ``lambda * onehot(y) + (1 - lambda) * onehot(y_partner)``, a float ``(num_classes,)``
    row; for the other methods the label is the source's ``int`` label, so
    ``DataLoader(pool)`` can be the ``synthetic_id_loader`` of :func:`~dreamood.training.train_classifier`
    (which takes CutMix's rows as target distributions).

    Args:
        dataset: A map-style dataset of ``(image, label)`` items; images are tensors ``(C, H, W)`` in ``[0, 1]``
            (or ``uint8``, or PIL images), all of one size for CutMix.
        method: One of :data:`AUGMENTATIONS`.
        num_per_class: Copies per class.
        labels: The label of every item of ``dataset`` (default: ``dataset.targets``, or the second tensor of a
            ``TensorDataset``).
        num_classes: Number of classes (default: the largest label + 1); each needs at least one image.
        seed: Seed of the source order, the partners and the augmentations.
        transform: Applied to each augmented float image (e.g. ``Normalize``).

    Attributes:
        sources: Dataset index of each item's source image ``(len(pool),)``.
        partners: Dataset index of each item's CutMix partner, or ``None`` for the other methods.
        seeds: Seed of each item's augmentation: item ``i`` is drawn right after ``torch.manual_seed(seeds[i])``
            (inside ``torch.random.fork_rng``, so the global random state is left as it was).

    Raises:
        ValueError: ``method`` is unknown, a count is not positive, or a class has no image.
        TypeError: Labels are missing or not integers.
    """

    def __init__(
        self,
        dataset: Dataset[Any],
        method: str,
        *,
        num_per_class: int,
        labels: Any = None,
        num_classes: int | None = None,
        seed: int = 0,
        transform: Transform | None = None,
    ) -> None:
        check_choice(method, AUGMENTATIONS, "method")
        check_positive_int(num_per_class, "num_per_class")
        check_positive_int(seed, "seed", allow_zero=True)
        all_labels = _dataset_labels(dataset, labels)
        if num_classes is None:
            if all_labels.numel() == 0:
                raise ValueError("dataset is empty")
            num_classes = int(all_labels.max()) + 1
        check_positive_int(num_classes, "num_classes")
        if all_labels.numel() and int(all_labels.max()) >= num_classes:
            raise ValueError(f"labels must lie in [0, {num_classes}), got a label {int(all_labels.max())}")
        generator = torch.Generator().manual_seed(seed)
        per_class = []
        for label in range(num_classes):
            members = (all_labels == label).nonzero().squeeze(1)
            if members.numel() == 0:
                raise ValueError(f"class {label} has no image in dataset; every class needs at least one")
            order = members[torch.randperm(members.numel(), generator=generator)]
            per_class.append(order.repeat(math.ceil(num_per_class / members.numel()))[:num_per_class])
        self.dataset = dataset
        self.method = method
        self.num_per_class = num_per_class
        self.num_classes = num_classes
        self.seed = seed
        self.transform = transform
        self.sources = torch.cat(per_class)
        self.partners = (
            torch.randint(len(all_labels), (self.sources.numel(),), generator=generator) if method == "cutmix" else None
        )
        self._labels = all_labels
        self.seeds = torch.randint(0, 2**62, (self.sources.numel(),), generator=generator)
        self._augment = None if method == "cutmix" else augmentation_transform(method)

    def __len__(self) -> int:
        """``num_classes * num_per_class``."""
        return int(self.sources.numel())

    def _image(self, index: int) -> Tensor:
        item = self.dataset[index]
        image = item[0] if isinstance(item, (tuple, list)) else item
        return _as_float_image(image, f"dataset[{index}] image")

    def __getitem__(self, index: int) -> tuple[Tensor, Any]:
        """The ``index``-th augmented image and its label (``int``, or a float distribution for CutMix)."""
        source = int(self.sources[index])
        image = self._image(source)
        target: Any = int(self._labels[source])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(self.seeds[index]))
            if self.partners is None:
                assert self._augment is not None
                image = augment_image(image, self._augment)
            else:
                partner = int(self.partners[index])
                pair = torch.stack([image, self._image(partner)])
                pair_labels = torch.stack([self._labels[source], self._labels[partner]])
                mixed, soft = _cutmix(pair, pair_labels, self.num_classes)
                image, target = mixed[0], soft[0]
        if self.transform is not None:
            image = self.transform(image)
        return image, target

    def __repr__(self) -> str:
        return (
            f"AugmentedPool(method={self.method!r}, num_per_class={self.num_per_class}, "
            f"num_classes={self.num_classes}, seed={self.seed})"
        )


class AugmentedLoader:
    """Wrap a loader so that every batch is augmented anew, epoch after epoch (paper Table 5).

    Single-image methods augment each image of the batch (its labels are kept); CutMix mixes the batch as
    torchvision does (image ``i`` gets a box of image ``i - 1`` of the batch, one ``lambda`` per batch) and returns
    target distributions ``(N, num_classes)``, which :func:`~dreamood.training.train_classifier` takes as labels.
    Batch ``b`` of pass ``e`` draws its randomness from a seed derived from ``(seed, e, b)``; the pass counter
    starts at 0 and advances at every ``iter()`` (:meth:`set_epoch` sets it). With any method the wrapper can be
    the ``id_loader`` of :func:`~dreamood.training.train_classifier` in a single process; it exposes the wrapped
    loader's ``sampler`` and ``generator`` so the loop's checkpoints keep its shuffling state. When resuming a
    run at epoch ``e``, call ``set_epoch(e)`` first so that the resumed epochs draw the same augmentations.

    Args:
        loader: Yields ``(images, labels)`` batches, images ``(N, C, H, W)`` in ``[0, 1]`` (or ``uint8``).
        method: One of :data:`AUGMENTATIONS`.
        num_classes: Number of classes; required for CutMix.
        seed: Seed of the augmentations.

    Raises:
        ValueError: ``method`` is unknown, or CutMix is asked for without ``num_classes``.
        TypeError: ``loader`` is not iterable.
    """

    def __init__(self, loader: Iterable[Any], method: str, *, num_classes: int | None = None, seed: int = 0) -> None:
        check_choice(method, AUGMENTATIONS, "method")
        check_positive_int(seed, "seed", allow_zero=True)
        if not isinstance(loader, Iterable):
            raise TypeError(f"loader must be an iterable of (images, labels) batches, got {type(loader).__name__}")
        if method == "cutmix":
            if num_classes is None:
                raise ValueError("num_classes is required for CutMix (the width of the mixed labels)")
            check_positive_int(num_classes, "num_classes")
        self.loader = loader
        self.method = method
        self.num_classes = num_classes
        self.seed = seed
        self.epoch = 0
        self.sampler = getattr(loader, "sampler", None)
        self.generator = getattr(loader, "generator", None)
        self._augment = None if method == "cutmix" else augmentation_transform(method)

    def set_epoch(self, epoch: int) -> None:
        """Make the next pass draw the augmentations of pass ``epoch``."""
        check_positive_int(epoch, "epoch", allow_zero=True)
        self.epoch = epoch

    def __len__(self) -> int:
        """The wrapped loader's length."""
        return len(self.loader)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        """Yield the augmented ``(images, labels)`` batches of one pass."""
        epoch = self.epoch
        self.epoch += 1
        for index, batch in enumerate(self.loader):
            if not (isinstance(batch, (tuple, list)) and len(batch) >= 2 and isinstance(batch[0], Tensor)):
                raise TypeError(f"loader must yield (images, labels) batches, got a {type(batch).__name__}")
            images, labels = batch[0], as_tensor(batch[1], "labels")
            if images.dim() != 4:
                raise ValueError(f"loader images must be (N, C, H, W), got shape {tuple(images.shape)}")
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(_derived_seed(self.seed, epoch, index))
                if self._augment is None:
                    assert self.num_classes is not None
                    images, labels = _cutmix(images, labels, self.num_classes)
                else:
                    images = torch.stack([augment_image(image, self._augment) for image in images])
            yield images, labels

    def __repr__(self) -> str:
        return f"AugmentedLoader(method={self.method!r}, num_classes={self.num_classes}, seed={self.seed})"
