"""Read a folder written by :func:`~dreamood.decoding.generation.generate_images` back as a dataset."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from dreamood._validation import check_choice, check_size_pair
from dreamood.decoding.generation import CLASSES_NAME, MANIFEST_NAME
from dreamood.errors import ArtifactError

__all__ = ["GeneratedImageFolder"]


class GeneratedImageFolder(Dataset[tuple[Any, int]]):
    """Generated images with the labels listed in the folder's ``manifest.jsonl``.

    Each item is ``(image, label)``: the label is the class the image's embedding was sampled for (for
    imagined outliers, the class they were sampled around), read from the manifest, so folders of every layout
    (``007/`` as written now, ``7/`` as written before) get the right labels. Without ``transform`` the image is a float
    tensor ``(C, H, W)`` in ``[0, 1]``; with one, ``transform`` receives the PIL image (after the mode
    conversion and the resize), as with torchvision datasets, and its result is returned.

    Args:
        root: A folder written by ``generate_images``.
        image_size: Resize every image to ``image_size x image_size`` (or ``(height, width)``) with
            antialiased bilinear filtering, for example to the ID resolution; ``None`` keeps the size.
        transform: Optional callable applied to the PIL image.
        mode: ``"RGB"`` (3 channels) or ``"L"`` (grayscale, 1 channel).

    Attributes:
        root: The folder.
        records: The manifest rows, in image-index order.
        samples: ``(path, label)`` pairs, in image-index order.
        targets: The labels.
        classes: Class names by class index: the folder's ``classes.json`` when present (every class of the
            decoder), else the names in the manifest (``""`` for classes without images).
        class_to_idx: Class name -> class index, as torchvision's ``ImageFolder`` has it (named classes only).

    Raises:
        FileNotFoundError: ``root`` or its manifest is missing.
        ArtifactError: The manifest is malformed.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        image_size: int | Sequence[int] | None = None,
        transform: Callable[[Any], Any] | None = None,
        mode: str = "RGB",
    ) -> None:
        check_choice(mode, ("RGB", "L"), "mode")
        self.root = Path(root)
        self.image_size = None if image_size is None else check_size_pair(image_size, "image_size")
        self.transform = transform
        self.mode = mode
        manifest = self.root / MANIFEST_NAME
        if not manifest.is_file():
            raise FileNotFoundError(
                f"no {MANIFEST_NAME} in {self.root}: not a generated image folder, or its generation is not "
                "finished (run generate_images again with the same arguments to complete it)"
            )
        self.records: list[dict[str, Any]] = []
        for number, line in enumerate(manifest.read_text().splitlines(), start=1):
            try:
                record = json.loads(line)
                valid = isinstance(record["path"], str) and isinstance(record["class_index"], int)
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                raise ArtifactError(f"{manifest} line {number} is not a valid manifest row: {error}") from error
            if not valid or record["class_index"] < 0:
                raise ArtifactError(f"{manifest} line {number} needs a string 'path' and a class_index >= 0: {line}")
            relative = Path(record["path"])
            if relative.is_absolute() or ".." in relative.parts:
                raise ArtifactError(
                    f"{manifest} line {number} lists {record['path']!r}, a path outside the generated folder"
                )
            self.records.append(record)
        self.samples: list[tuple[Path, int]] = [(self.root / r["path"], int(r["class_index"])) for r in self.records]
        self.targets: list[int] = [label for _, label in self.samples]
        self.classes: list[str] = [""] * (max(self.targets, default=-1) + 1)
        for record in self.records:
            self.classes[int(record["class_index"])] = str(record.get("class_name", ""))
        listed = self.root / CLASSES_NAME
        if listed.is_file():
            try:
                names = json.loads(listed.read_text(encoding="utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as error:
                raise ArtifactError(f"{listed} is not valid JSON: {error}") from error
            if not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
                raise ArtifactError(f"{listed} must hold a JSON list of class names, got {str(names)[:80]}")
            if len(names) < len(self.classes):
                raise ArtifactError(
                    f"{listed} names {len(names)} classes but {manifest} has class_index up to {len(self.classes) - 1}"
                )
            self.classes = names
        self.class_to_idx: dict[str, int] = {name: index for index, name in enumerate(self.classes) if name}

    def __len__(self) -> int:
        return len(self.samples)

    def __repr__(self) -> str:
        return f"GeneratedImageFolder(root={str(self.root)!r}, num_images={len(self)}, mode={self.mode!r})"

    def load_image(self, index: int) -> Any:
        """The PIL image of item ``index``, converted to ``mode`` and resized.

        Raises:
            FileNotFoundError: The image file is missing.
            ArtifactError: The file is truncated or not a readable image.
        """
        from PIL import Image

        path = self.samples[index][0]
        if not path.is_file():
            raise FileNotFoundError(f"generated image missing: {path} (listed in {self.root / MANIFEST_NAME})")
        try:
            with Image.open(path) as opened:
                image = opened.convert(self.mode)
        except Exception as error:  # PIL raises several types for truncated or corrupt files
            raise ArtifactError(f"cannot read generated image {path}: {type(error).__name__}: {error}") from error
        if self.image_size is not None and image.size != (self.image_size[1], self.image_size[0]):
            image = image.resize((self.image_size[1], self.image_size[0]), Image.Resampling.BILINEAR)
        return image

    def __getitem__(self, index: int) -> tuple[Any, int]:
        """Return ``(image, label)`` of item ``index``."""
        image = self.load_image(index)
        label = self.samples[index][1]
        if self.transform is not None:
            return self.transform(image), label
        return _to_tensor(image), label


def _to_tensor(image: Any) -> Tensor:
    import numpy as np

    array = np.asarray(image, dtype=np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 255.0
