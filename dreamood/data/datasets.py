"""In-distribution datasets: CIFAR-100, ImageNet-100, ImageNet-A / ImageNet-V2 subsets and plain class folders.

ImageNet-100 is the paper's 100-class subset of ImageNet-1k (Du et al., NeurIPS 2023). :class:`ImageNet100`
indexes the 100 class folders of an ImageNet-1k tree in place (nothing is copied), with labels in the paper's
class order (:data:`~dreamood.data.classes.IMAGENET100_WNIDS`); :func:`link_imagenet_subset` builds a tree of
symbolic links for tools that expect a folder of class folders.

A missing or malformed root raises one :class:`FileNotFoundError` or :class:`ValueError` that states the
expected layout, before torchvision is involved.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from dreamood.data.classes import IMAGENET1K_WNIDS, IMAGENET100_WNIDS

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageListDataset",
    "ImageNet100",
    "ImageNetA",
    "ImageNetV2",
    "cifar100",
    "class_folder_dataset",
    "find_images",
    "link_imagenet_subset",
    "with_transform",
]

#: File name endings read as images (compared case-insensitively).
IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")

Transform = Callable[[Any], Any]


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def find_images(root: str | os.PathLike[str], *, recursive: bool = True) -> list[Path]:
    """Return the image files under ``root`` (by extension, hidden files skipped), sorted by path.

    Args:
        root: A folder.
        recursive: Also look inside sub-folders (symbolic links to folders are followed).

    Returns:
        The image paths, sorted.

    Raises:
        FileNotFoundError: ``root`` is not a folder.
    """
    folder = Path(root)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    if not recursive:
        return sorted(p for p in folder.iterdir() if p.is_file() and _is_image(p.name))
    found: list[Path] = []
    for directory, _, files in os.walk(folder, followlinks=True):
        found.extend(Path(directory) / name for name in files if _is_image(name))
    return sorted(found)


def _load_rgb(path: str | os.PathLike[str]) -> Any:
    from PIL import Image

    with Image.open(path) as image:
        return image.convert("RGB")


class ImageListDataset(Dataset[tuple[Any, int]]):
    """A dataset of image files with integer labels, read with PIL as RGB and passed through ``transform``.

    Args:
        samples: ``(path, label)`` pairs; the label is ``-1`` for unlabelled (OOD) images.
        transform: Applied to each PIL image (``None`` returns the PIL image).
        classes: Names of the classes, indexed by label.

    Attributes:
        samples: The ``(path, label)`` pairs.
        targets: The labels, in sample order.
        classes: The class names.
        transform: The image transform.
    """

    def __init__(
        self,
        samples: Sequence[tuple[str | os.PathLike[str], int]],
        transform: Transform | None = None,
        *,
        classes: Sequence[str] = (),
    ) -> None:
        self.samples: list[tuple[str, int]] = [(os.fspath(path), int(label)) for path, label in samples]
        self.targets: list[int] = [label for _, label in self.samples]
        self.classes: list[str] = list(classes)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        path, label = self.samples[index]
        image = _load_rgb(path)
        return (self.transform(image) if self.transform is not None else image), label

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_samples={len(self)}, num_classes={len(self.classes)})"


def with_transform(dataset: Any, transform: Transform | None) -> Any:
    """A view of ``dataset`` that reads the same images through another transform, without loading them again.

    The view is a shallow copy: the images (a torchvision dataset's ``data`` array, an
    :class:`ImageListDataset`'s ``samples``) and the labels are shared with ``dataset``, which keeps its own
    transform. Use it for the several views of one training set (augmented, plain, raw) instead of loading
    the set once per view.

    Args:
        dataset: A dataset that applies its ``transform`` attribute to each image: any torchvision dataset
            built with ``transform=`` (for example :func:`cifar100`) or an :class:`ImageListDataset`.
        transform: The view's transform (``None``: the images as read).

    Returns:
        The view, of the same type as ``dataset``.

    Raises:
        TypeError: ``dataset`` has no ``transform`` attribute.
        ValueError: ``dataset`` is a torchvision dataset built with a joint ``transforms=`` callable, which a
            new ``transform`` cannot replace.
    """
    if not hasattr(dataset, "transform"):
        raise TypeError(f"dataset must have a 'transform' attribute, got {type(dataset).__name__}")
    view = copy.copy(dataset)
    view.transform = transform
    joint = getattr(dataset, "transforms", None)
    if hasattr(dataset, "transforms"):  # torchvision keeps transform and target_transform wrapped in `transforms` too
        from torchvision.datasets.vision import StandardTransform

        if joint is not None and not isinstance(joint, StandardTransform):
            raise ValueError(
                f"dataset applies a joint transforms={joint!r}, which a new transform cannot replace; build the "
                "dataset with transform= instead"
            )
        target_transform = getattr(dataset, "target_transform", None)
        has_any = transform is not None or target_transform is not None
        view.transforms = StandardTransform(transform, target_transform) if has_any else None
    return view


# ---- CIFAR-100 ---------------------------------------------------------------------------------------------

_CIFAR_LAYOUT = (
    "{root}/cifar-100-python/ holding the files train, test and meta (the Python version of CIFAR-100, "
    "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz, extracted in {root})"
)


def cifar100(
    root: str | os.PathLike[str], train: bool = True, transform: Transform | None = None, *, download: bool = False
) -> Any:
    """CIFAR-100 through ``torchvision.datasets.CIFAR100``, with a clear error when the files are missing.

    Args:
        root: The folder that holds ``cifar-100-python/`` (passing the ``cifar-100-python`` folder itself also
            works).
        train: The 50,000 training images, or the 10,000 test images.
        transform: Applied to each PIL image, e.g. :func:`~dreamood.data.transforms.cifar_train_transform`.
        download: Download the archive into ``root`` when it is missing (needs network access).

    Returns:
        The torchvision dataset, yielding ``(image, fine_label)``.

    Raises:
        FileNotFoundError: The files are missing and ``download`` is false.
        ValueError: The files exist but torchvision rejects them (checksum mismatch, truncated download).
    """
    folder = Path(root).expanduser()
    if folder.name == "cifar-100-python" and (folder / "meta").is_file():
        folder = folder.parent
    parts = [folder / "cifar-100-python" / name for name in ("train", "test", "meta")]
    if not download and not all(part.is_file() for part in parts):
        missing = ", ".join(str(p) for p in parts if not p.is_file())
        raise FileNotFoundError(
            f"CIFAR-100 not found: missing {missing}. Expected {_CIFAR_LAYOUT.format(root=folder)}; "
            "or pass download=True."
        )
    from torchvision.datasets import CIFAR100

    try:
        return CIFAR100(str(folder), train=train, transform=transform, download=download)
    except RuntimeError as error:
        raise ValueError(
            f"CIFAR-100 under {folder} is corrupted or incomplete ({error}). Expected "
            f"{_CIFAR_LAYOUT.format(root=folder)}; delete the folder and extract the archive again."
        ) from error


# ---- ImageNet-100 and its generalisation sets -------------------------------------------------------------

_IMAGENET_LAYOUT = (
    "an ImageNet-1k folder holding train/ and val/, each with one sub-folder of images per WordNet id "
    "(train/n01498041/*.JPEG, ..., val/n01498041/*.JPEG, ...); the official flat val/ folder must first be "
    "sorted into class folders (for example with the valprep.sh script of the PyTorch ImageNet example)"
)


def _check_splits(split: str) -> None:
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")


def _class_folder_samples(folders: Sequence[Path]) -> list[tuple[Path, int]]:
    samples: list[tuple[Path, int]] = []
    for label, folder in enumerate(folders):
        samples.extend((path, label) for path in find_images(folder))
    return samples


def _missing_message(missing: Sequence[str], where: Path) -> str:
    shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
    return f"{len(missing)} class folder(s) missing under {where}: {shown}"


class ImageNet100(ImageListDataset):
    """The paper's ImageNet-100: the 100 classes of :data:`IMAGENET100_WNIDS`, read in place from ImageNet-1k.

    Only the class folders of ``wnids`` are indexed (nothing is copied or linked); label ``i`` is ``wnids[i]``.

    Args:
        root: ImageNet-1k root holding ``train/`` and ``val/`` with one folder per WordNet id (or a tree made
            by :func:`link_imagenet_subset`).
        split: ``"train"`` or ``"val"``.
        transform: Applied to each PIL image, e.g. :func:`~dreamood.data.transforms.imagenet_train_transform`.
        wnids: The class WordNet ids in label order (the paper's ImageNet-100 by default).

    Attributes:
        wnids: The WordNet ids, indexed by label.
        classes: Same as ``wnids``.

    Raises:
        FileNotFoundError: ``root/split`` is missing, or one of the class folders is.
        ValueError: ``split`` is unknown, ``val/`` is the flat official layout, or a class folder has no image.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        split: str = "train",
        transform: Transform | None = None,
        *,
        wnids: Sequence[str] = IMAGENET100_WNIDS,
    ) -> None:
        _check_splits(split)
        split_dir = Path(root).expanduser() / split
        if not split_dir.is_dir():
            raise FileNotFoundError(f"ImageNet {split} folder not found: {split_dir}. Expected {_IMAGENET_LAYOUT}.")
        missing = [w for w in wnids if not (split_dir / w).is_dir()]
        if missing:
            flat = find_images(split_dir, recursive=False)
            if flat:
                raise ValueError(
                    f"{split_dir} holds {len(flat)} images directly instead of class folders. Expected "
                    f"{_IMAGENET_LAYOUT}."
                )
            raise FileNotFoundError(f"{_missing_message(missing, split_dir)}. Expected {_IMAGENET_LAYOUT}.")
        samples = _class_folder_samples([split_dir / w for w in wnids])
        counts = [0] * len(wnids)
        for _, label in samples:
            counts[label] += 1
        empty = [w for w, n in zip(wnids, counts) if n == 0]
        if empty:
            raise ValueError(f"class folders without images under {split_dir}: {', '.join(empty[:5])}")
        super().__init__(samples, transform, classes=wnids)
        self.wnids: list[str] = list(wnids)


def link_imagenet_subset(
    imagenet_root: str | os.PathLike[str],
    target: str | os.PathLike[str],
    *,
    wnids: Sequence[str] = IMAGENET100_WNIDS,
    splits: Sequence[str] = ("train", "val"),
) -> Path:
    """Make ``target/<split>/<wnid>`` symbolic links to the class folders of an ImageNet-1k tree.

    The result is an ImageNet-100 tree that takes no space and that ``torchvision.datasets.ImageFolder`` and
    :class:`ImageNet100` both read. Note that ``ImageFolder`` orders classes by sorted WordNet id, while the
    paper's labels follow ``wnids``; :class:`ImageNet100` keeps the paper's order.

    Args:
        imagenet_root: ImageNet-1k root holding ``train/`` and ``val/`` class folders.
        target: Folder to create the links in (created when missing).
        wnids: The WordNet ids to link.
        splits: The splits to link.

    Returns:
        ``target``.

    Raises:
        FileNotFoundError: A split or class folder of ``imagenet_root`` is missing.
        ValueError: A WordNet id is not a single folder name (``"../val"``, say).
        FileExistsError: ``target/<split>/<wnid>`` exists and is not a link to the same folder.
    """
    source = Path(imagenet_root).expanduser().resolve()
    destination = Path(target).expanduser()
    for wnid in wnids:
        if not wnid or Path(wnid).name != wnid or wnid in (".", ".."):
            raise ValueError(f"wnids must be single folder names such as 'n01440764', got {wnid!r}")
    for split in splits:
        _check_splits(split)
        missing = [w for w in wnids if not (source / split / w).is_dir()]
        if missing:
            raise FileNotFoundError(f"{_missing_message(missing, source / split)}. Expected {_IMAGENET_LAYOUT}.")
    for split in splits:
        (destination / split).mkdir(parents=True, exist_ok=True)
        for wnid in wnids:
            link = destination / split / wnid
            origin = source / split / wnid
            if link.is_symlink() and link.resolve() == origin.resolve():
                continue
            if link.exists() or link.is_symlink():
                raise FileExistsError(f"{link} exists and is not a link to {origin}")
            link.symlink_to(origin, target_is_directory=True)
    return destination


class ImageNetA(ImageListDataset):
    """ImageNet-A (Hendrycks et al., CVPR 2021) restricted to the classes of ``wnids``, labelled by their index.

    ImageNet-A covers 200 of the ImageNet-1k classes; only the folders of ``wnids`` that exist are read, so the
    set holds the classes both share. Used to measure how DREAM-ID's generated inliers help generalisation.

    Args:
        root: The ``imagenet-a`` folder, holding one folder per WordNet id.
        transform: Applied to each PIL image (the ImageNet test transform in the paper).
        wnids: The in-distribution classes in label order (the paper's ImageNet-100 by default).

    Attributes:
        wnids: The in-distribution WordNet ids, indexed by label.
        present: The WordNet ids that have a folder in ``root``.

    Raises:
        FileNotFoundError: ``root`` is missing.
        ValueError: ``root`` has no folder for any class of ``wnids``.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        transform: Transform | None = None,
        *,
        wnids: Sequence[str] = IMAGENET100_WNIDS,
    ) -> None:
        folder = Path(root).expanduser()
        layout = "the imagenet-a folder holding one folder of images per WordNet id (imagenet-a/n01498041/*.jpg)"
        if not folder.is_dir():
            raise FileNotFoundError(f"ImageNet-A folder not found: {folder}. Expected {layout}.")
        present = [w for w in wnids if (folder / w).is_dir()]
        if not present:
            raise ValueError(f"{folder} has no folder for any of the {len(wnids)} classes. Expected {layout}.")
        samples = [(p, label) for label, w in enumerate(wnids) if w in present for p in find_images(folder / w)]
        super().__init__(samples, transform, classes=wnids)
        self.wnids: list[str] = list(wnids)
        self.present: list[str] = present


class ImageNetV2(ImageListDataset):
    """ImageNet-V2 (Recht et al., ICML 2019) restricted to the classes of ``wnids``, labelled by their index.

    ImageNet-V2's folders are named by ImageNet-1k class index ``0..999``; folder ``i`` holds class
    ``IMAGENET1K_WNIDS[i]`` (the sorted-WordNet-id order), which is mapped to its index in ``wnids``.

    Args:
        root: An ImageNet-V2 folder (e.g. ``imagenetv2-matched-frequency-format-val``) holding folders ``0`` to
            ``999``.
        transform: Applied to each PIL image (the ImageNet test transform in the paper).
        wnids: The in-distribution classes in label order (the paper's ImageNet-100 by default).

    Attributes:
        wnids: The in-distribution WordNet ids, indexed by label.

    Raises:
        FileNotFoundError: ``root`` or the folder of one of the classes is missing.
        ValueError: A class of ``wnids`` is not an ImageNet-1k WordNet id.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        transform: Transform | None = None,
        *,
        wnids: Sequence[str] = IMAGENET100_WNIDS,
    ) -> None:
        folder = Path(root).expanduser()
        layout = "an ImageNet-V2 folder holding folders 0 to 999 named by ImageNet-1k class index"
        if not folder.is_dir():
            raise FileNotFoundError(f"ImageNet-V2 folder not found: {folder}. Expected {layout}.")
        index_of = {wnid: i for i, wnid in enumerate(IMAGENET1K_WNIDS)}
        unknown = [w for w in wnids if w not in index_of]
        if unknown:
            raise ValueError(f"wnids holds names that are not ImageNet-1k WordNet ids: {unknown[:5]}")
        folders = [folder / str(index_of[w]) for w in wnids]
        missing = [f.name for f in folders if not f.is_dir()]
        if missing:
            raise FileNotFoundError(f"{_missing_message(missing, folder)}. Expected {layout}.")
        super().__init__(_class_folder_samples(folders), transform, classes=wnids)
        self.wnids: list[str] = list(wnids)


# ---- any dataset stored as class folders -------------------------------------------------------------------


def class_folder_dataset(
    root: str | os.PathLike[str], transform: Transform | None = None, *, classes: Sequence[str] | None = None
) -> ImageListDataset:
    """A dataset stored as one folder of images per class (``root/<class>/*.png``).

    Args:
        root: The folder of class folders.
        transform: Applied to each PIL image.
        classes: Folder names in label order; default: every sub-folder, sorted.

    Returns:
        The dataset; ``classes`` holds the folder names.

    Raises:
        FileNotFoundError: ``root`` or one of ``classes`` is missing.
        ValueError: ``root`` has no sub-folder, or a class folder has no image.
    """
    folder = Path(root).expanduser()
    layout = "one sub-folder of images per class (root/<class name>/<image>.png)"
    if not folder.is_dir():
        raise FileNotFoundError(f"dataset folder not found: {folder}. Expected {layout}.")
    names = sorted(p.name for p in folder.iterdir() if p.is_dir()) if classes is None else list(classes)
    if not names:
        raise ValueError(f"{folder} has no class folder. Expected {layout}.")
    missing = [name for name in names if not (folder / name).is_dir()]
    if missing:
        raise FileNotFoundError(f"{_missing_message(missing, folder)}. Expected {layout}.")
    samples = _class_folder_samples([folder / name for name in names])
    counts = {label for _, label in samples}
    empty = [name for label, name in enumerate(names) if label not in counts]
    if empty:
        raise ValueError(f"class folders without images under {folder}: {', '.join(empty[:5])}")
    return ImageListDataset(samples, transform, classes=names)
