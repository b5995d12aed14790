"""DeepAugment images as a dataset: pre-made augmented copies of the training set that you supply.

DeepAugment (Hendrycks, Basart, Mu, Kadavath, Wang, Dorundo, Desai, Zhu, Parajuli, Guo, Song, Steinhardt,
Gilmer, "The Many Faces of Robustness: A Critical Analysis of Out-of-Distribution Generalization", ICCV 2021)
distorts images by passing them through image-to-image networks with perturbed weights. Its images are made
offline with the authors' code; DREAM-ID's Table 4 appends them to the training set. This module only reads
them, labelled by class folder or by a manifest, so that they can be the ``synthetic_id_loader`` of
:func:`~dreamood.training.train_classifier`.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path

from dreamood._validation import check_class_names
from dreamood.data.datasets import ImageListDataset, Transform, class_folder_dataset

__all__ = ["deepaugment_dataset"]


def deepaugment_dataset(
    root: str | os.PathLike[str],
    classes: Sequence[str],
    *,
    manifest: str | os.PathLike[str] | None = None,
    transform: Transform | None = None,
) -> ImageListDataset:
    """A dataset over a folder of DeepAugment images, with the ID training set's labels.

    Two layouts are read:

    * **class folders** (no ``manifest``): ``root/<class>/<image>``, where ``<class>`` is an entry of
      ``classes`` and its label is that entry's position (a folder per class, each with at least one image);
    * **manifest**: a CSV file with a header ``path,label``; ``path`` is relative to ``root`` (or absolute) and
      ``label`` is a class of ``classes`` or its integer index.

    Args:
        root: The folder of images.
        classes: Names (or folder names, e.g. WordNet ids) of the ID classes in label order.
        manifest: The CSV manifest, if the images are not sorted into class folders.
        transform: Applied to each PIL image (as the ID training transform).

    Returns:
        The dataset (RGB PIL images through ``transform``, integer labels).

    Raises:
        FileNotFoundError: ``root``, a class folder, the manifest or an image it lists is missing.
        ValueError: A class folder is empty, or the manifest is malformed or names an unknown class.
    """
    names = check_class_names(classes, "classes")
    folder = Path(root).expanduser()
    if manifest is None:
        return class_folder_dataset(folder, transform, classes=names)
    if not folder.is_dir():
        raise FileNotFoundError(f"DeepAugment folder not found: {folder}")
    manifest_path = Path(manifest).expanduser()
    if not manifest_path.is_file():
        raise FileNotFoundError(f"manifest not found: {manifest_path}")
    index = {name: label for label, name in enumerate(names)}
    samples: list[tuple[Path, int]] = []
    with manifest_path.open(newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None or [cell.strip() for cell in header] != ["path", "label"]:
            raise ValueError(f"{manifest_path} must start with the header 'path,label', got {header!r}")
        for line, row in enumerate(reader, start=2):
            if not row:
                continue
            if len(row) != 2 or not row[0].strip():
                raise ValueError(f"{manifest_path}:{line}: expected 'path,label', got {row!r}")
            path = folder / row[0].strip()
            samples.append((path, _label(row[1].strip(), index, len(names), f"{manifest_path}:{line}")))
    if not samples:
        raise ValueError(f"{manifest_path} lists no image")
    missing = [str(path) for path, _ in samples if not path.is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} image(s) listed in {manifest_path} are missing, e.g. {missing[0]}")
    return ImageListDataset(samples, transform, classes=names)


def _label(text: str, index: dict[str, int], count: int, where: str) -> int:
    if text in index:
        return index[text]
    try:
        label = int(text)
    except ValueError:
        raise ValueError(f"{where}: label {text!r} is neither a class name nor an integer index") from None
    if not 0 <= label < count:
        raise ValueError(f"{where}: label {label} is outside [0, {count})")
    return label
