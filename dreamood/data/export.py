"""Hand generated images to other tools: an ImageFolder tree with class names, an OpenOOD image list, pytorch-ood.

- :func:`export_generated` with ``format="imagefolder"`` writes ``out_dir/<index>_<name>/<image>.png``: the
  class folders sort in class-index order (zero-padded index first), so torchvision's ``ImageFolder`` gives every
  image the class index as label, and ``dataset.classes`` shows the names. ``classes.json`` lists the names.
- ``format="openood"`` writes the same tree plus ``imglist.txt``, one ``<path> <label>`` line per image with
  the path relative to ``out_dir``: OpenOOD's image-list format (its ``ImglistDataset`` joins ``data_dir`` and
  the path, and treats a negative label as an outlier: a uniform soft label, as in its outlier-exposure lists).
  Use ``data_dir: out_dir`` and ``imglist_pth: out_dir/imglist.txt`` in its config. Outliers get label ``-1``
  unless ``labels="class"`` (DREAM-ID's inliers keep their class).
- :func:`outlier_dataset` reads a generated folder as a dataset whose every target is ``-1``, what pytorch-ood's
  outlier-exposure losses expect of outliers (``target < 0`` marks an outlier there, as ``ToUnknown`` does).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dreamood._validation import check_choice
from dreamood.data.datasets import ImageListDataset
from dreamood.data.generated import GeneratedImageFolder
from dreamood.decoding.generation import CLASSES_NAME, MANIFEST_NAME, class_folder_name

__all__ = ["EXPORT_FORMATS", "IMGLIST_NAME", "ExportResult", "export_generated", "outlier_dataset"]

#: The formats :func:`export_generated` writes.
EXPORT_FORMATS = ("imagefolder", "openood")
#: File name of the OpenOOD image list written by ``format="openood"``.
IMGLIST_NAME = "imglist.txt"
_LINK_MODES = ("copy", "hardlink", "symlink")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_generated` wrote.

    Attributes:
        out_dir: The exported tree.
        num_images: Number of images written.
        class_folders: The class folder names, by class index (``""`` for classes without images).
        imglist: The OpenOOD image list (``format="openood"``), else ``None``.
    """

    out_dir: Path
    num_images: int
    class_folders: list[str]
    imglist: Path | None


def _folder_name(index: int, name: str, num_classes: int) -> str:
    """``007_aquarium_fish``: the zero-padded index, then the name with anything but letters, digits, ``._-`` as
    ``_`` (no spaces: OpenOOD splits a list line at its first space)."""
    safe = _UNSAFE.sub("_", name).strip("_")
    prefix = class_folder_name(index, num_classes)
    return f"{prefix}_{safe}" if safe else prefix


def export_generated(
    source: str | os.PathLike[str] | GeneratedImageFolder,
    out_dir: str | os.PathLike[str],
    format: str = "imagefolder",
    *,
    labels: str = "outlier",
    image_size: int | tuple[int, int] | None = None,
    link: str = "copy",
    overwrite: bool = False,
) -> ExportResult:
    """Write a generated folder as an ImageFolder tree with class names, optionally with an OpenOOD image list.

    Args:
        source: A folder written by :func:`~dreamood.decoding.generation.generate_images` (either class-folder
            layout) or a :class:`~dreamood.data.generated.GeneratedImageFolder` of it.
        out_dir: Where to write the tree (created; it must be empty or missing unless ``overwrite``).
        format: ``"imagefolder"`` (the tree and ``classes.json``) or ``"openood"`` (the same plus
            ``imglist.txt``).
        labels: Label of each line of the OpenOOD list: ``"outlier"`` (``-1``, for imagined outliers) or
            ``"class"`` (the class index, for labelled inliers such as DREAM-ID's).
        image_size: Resize the images to ``image_size`` (or ``(height, width)``) as ``GeneratedImageFolder``
            does, e.g. to the ID resolution; ``None`` keeps the files as they are.
        link: How unresized images get into the tree: ``"copy"``, ``"hardlink"`` (no extra disk, same file
            system only) or ``"symlink"``.
        overwrite: Write into a non-empty ``out_dir`` (files of the same name are replaced, others are kept).

    Returns:
        An :class:`ExportResult`.

    Raises:
        ValueError: An unknown ``format``, ``labels`` or ``link``, ``image_size`` with ``link`` other than
            ``"copy"``, ``out_dir`` inside the source folder, or a non-empty ``out_dir`` without ``overwrite``.
        FileNotFoundError: The source is not a generated folder, or one of its images is missing.
    """
    check_choice(format, EXPORT_FORMATS, "format")
    check_choice(labels, ("outlier", "class"), "labels")
    check_choice(link, _LINK_MODES, "link")
    if image_size is not None and link != "copy":
        raise ValueError(f"image_size resizes the images, so link must be 'copy', got link={link!r}")
    folder = source if isinstance(source, GeneratedImageFolder) else GeneratedImageFolder(source)
    if image_size is not None:
        folder = GeneratedImageFolder(folder.root, image_size=image_size, mode=folder.mode)
    target = Path(out_dir)
    if target.resolve() == folder.root.resolve() or folder.root.resolve() in target.resolve().parents:
        raise ValueError(f"out_dir {str(target)!r} lies inside the generated folder {str(folder.root)!r}")
    if target.exists() and any(target.iterdir()) and not overwrite:
        raise ValueError(f"out_dir {str(target)!r} is not empty; pass overwrite=True or choose another folder")
    for path, _ in folder.samples:
        if not path.is_file():
            raise FileNotFoundError(f"generated image missing: {path} (listed in {folder.root / MANIFEST_NAME})")

    num_classes = len(folder.classes)
    present = set(folder.targets)
    folders = [_folder_name(i, n, num_classes) if i in present else "" for i, n in enumerate(folder.classes)]
    target.mkdir(parents=True, exist_ok=True)
    lines: list[str] = []
    for index, (path, label) in enumerate(folder.samples):
        relative = Path(folders[label]) / f"{path.stem}.png"
        destination = target / relative
        destination.parent.mkdir(exist_ok=True)
        if destination.exists() or destination.is_symlink():
            destination.unlink()
        if image_size is not None:
            folder.load_image(index).save(destination, format="PNG")
        elif link == "copy":
            shutil.copyfile(path, destination)
        elif link == "hardlink":
            os.link(path, destination)
        else:
            destination.symlink_to(path.resolve())
        lines.append(f"{relative.as_posix()} {-1 if labels == 'outlier' else label}\n")
    (target / CLASSES_NAME).write_text(json.dumps(folder.classes, indent=1) + "\n")
    imglist = None
    if format == "openood":
        imglist = target / IMGLIST_NAME
        imglist.write_text("".join(lines))
    return ExportResult(out_dir=target, num_images=len(lines), class_folders=folders, imglist=imglist)


def outlier_dataset(
    source: str | os.PathLike[str] | GeneratedImageFolder,
    transform: Callable[[Any], Any] | None = None,
    *,
    label: int = -1,
) -> ImageListDataset:
    """The images of a generated folder as a dataset whose every target is ``label`` (``-1``: an outlier).

    pytorch-ood's outlier-exposure losses (``OutlierExposureLoss``, ``EnergyRegularizedLoss``, ...) take a
    negative target as "this sample is an outlier"; concatenate this dataset with the ID training set.

    Args:
        source: A generated folder or a :class:`~dreamood.data.generated.GeneratedImageFolder`.
        transform: Applied to each RGB PIL image (resize it to the ID resolution here).
        label: The target of every image; must be negative.

    Returns:
        An :class:`~dreamood.data.datasets.ImageListDataset` with the folder's class names as ``classes``.

    Raises:
        ValueError: ``label`` is not negative.
    """
    if isinstance(label, bool) or not isinstance(label, int) or label >= 0:
        raise ValueError(f"label must be a negative integer (pytorch-ood marks outliers by target < 0), got {label!r}")
    folder = source if isinstance(source, GeneratedImageFolder) else GeneratedImageFolder(source)
    return ImageListDataset([(path, label) for path, _ in folder.samples], transform, classes=folder.classes)
